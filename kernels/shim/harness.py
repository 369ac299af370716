"""Run a kernel body on the CPU: wrap it in a C++ function, compile with g++, execute.

`run_metal_body(src, launch)` takes the very `KernelSource` string the Python wrapper hands to
`mx.fast.metal_kernel` and the very `Launch` (inputs, template values, grid) the wrapper builds,
so what is tested is what would run on a Mac. `metal_shim.h` supplies the Metal built-ins.
`run_cuda_body` does the same for the CUDA twin, wrapped the way `mx.fast.cuda_kernel` wraps it
(template values as constexprs, grid in threads split into blocks), over `cuda_shim.h`.
Binaries are cached under the temp dir, keyed by a hash of the generated source and the flags.
Inputs and outputs travel as raw bytes in files. bfloat16 is not emulated (no C++ type here).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from .._common import KernelSource, Launch

SHIM_DIR = Path(__file__).resolve().parent
CXXFLAGS = ["-O1", "-std=c++20", "-ffp-contract=off", "-pthread"]

_CTYPE = {
    mx.uint8: "uint8_t",
    mx.uint32: "uint32_t",
    mx.int32: "int32_t",
    mx.float32: "float",
    mx.float16: "half",
}
_CUDA_TYPE = {**_CTYPE, mx.float16: "__half", mx.bfloat16: "__nv_bfloat16"}
_NPTYPE = {
    mx.uint8: np.uint8,
    mx.uint32: np.uint32,
    mx.int32: np.int32,
    mx.float32: np.float32,
    mx.float16: np.float16,
}


class ShimError(RuntimeError):
    """g++ is missing, or the body failed to compile or run."""


def have_compiler() -> bool:
    return shutil.which(os.environ.get("CXX", "g++")) is not None


def _ctype(dtype: mx.Dtype, table: dict = _CTYPE) -> str:
    if dtype not in table:
        raise ShimError(f"the shim has no C++ type for {dtype}")
    return table[dtype]


def _buffers(names, arrays_or_dtypes, table, pool: str, const: str) -> tuple[list[str], list[str]]:
    """(parameter declarations, call arguments) for the body's pointer arguments."""
    decls, calls = [], []
    for i, (n, x) in enumerate(zip(names, arrays_or_dtypes)):
        t = _ctype(x if isinstance(x, mx.Dtype) else x.dtype, table)
        decls.append(f"{const}{t}* {n}")
        calls.append(f"({t}*)g_{pool}[{i}]")
    return decls, calls


def cpp_source(src: KernelSource, launch: Launch) -> str:
    """The C++ translation unit for the Metal body: shim header, the body wrapped as a template
    function (as metal_kernel does), and a main that runs it over the grid."""
    tparams, targs = [], []
    for name, value in launch.template:
        if isinstance(value, mx.Dtype):
            tparams.append(f"typename {name}")
            targs.append(_ctype(value))
        elif isinstance(value, bool):
            tparams.append(f"bool {name}")
            targs.append("true" if value else "false")
        else:
            tparams.append(f"int {name}")
            targs.append(str(int(value)))
    in_d, in_c = _buffers(src.input_names, launch.inputs, _CTYPE, "in", "const device ")
    out_d, out_c = _buffers(src.output_names, launch.output_dtypes, _CTYPE, "out", "device ")
    template = f"template <{', '.join(tparams)}>\n" if tparams else ""
    call = f"body{'<' + ', '.join(targs) + '>' if targs else ''}({', '.join(in_c + out_c)}, p)"
    run = f"""
static void* lane_main(void* arg) {{
    // lane L of every simdgroup (32 consecutive x); simdgroups run one after another
    uint lane = (uint)(uintptr_t)arg;
    shim::t_lane = lane;
    for (uint z = 0; z < g_grid[2]; ++z)
        for (uint y = 0; y < g_grid[1]; ++y)
            for (uint x0 = 0; x0 < g_grid[0]; x0 += shim::kSimdWidth) {{
                uint3 p{{x0 + lane, y, z}};
                {call};
            }}
    return nullptr;
}}

static void run_grid() {{
    if ({"true" if src.simd else "false"}) {{
        shim_run_lanes(lane_main);
    }} else {{
        for (uint z = 0; z < g_grid[2]; ++z)
            for (uint y = 0; y < g_grid[1]; ++y)
                for (uint x = 0; x < g_grid[0]; ++x) {{
                    uint3 p{{x, y, z}};
                    {call};
                }}
    }}
}}
"""
    return f"""#include "metal_shim.h"
{_globals(launch)}
{src.metal_header}

{template}void body({", ".join(in_d + out_d + ["uint3 thread_position_in_grid"])}) {{
{src.metal}
}}

#undef device
#undef constant
#undef threadgroup
#undef thread
{run}{_MAIN}"""


def cuda_cpp_source(src: KernelSource, launch: Launch) -> str:
    """The C++ translation unit for the CUDA twin, wrapped like mx.fast.cuda_kernel: pointer
    arguments typed by dtype, template values as constexpr/using lines, then the body."""
    consts = []
    for name, value in launch.template:
        if isinstance(value, mx.Dtype):
            consts.append(f"  using {name} = {_ctype(value, _CUDA_TYPE)};")
        elif isinstance(value, bool):
            consts.append(f"  constexpr bool {name} = {'true' if value else 'false'};")
        else:
            consts.append(f"  constexpr int {name} = {int(value)};")
    in_d, in_c = _buffers(src.input_names, launch.inputs, _CUDA_TYPE, "in", "const ")
    out_d, out_c = _buffers(src.output_names, launch.output_dtypes, _CUDA_TYPE, "out", "")
    call = f"body({', '.join(in_c + out_c)})"
    tx, ty, tz = launch.threadgroup
    if src.simd and (tx, ty, tz) != (32, 1, 1):
        raise ShimError(f"{src.name}: the shim runs warp bodies with blocks of (32, 1, 1) only")
    run = f"""
static void walk_blocks(bool one_lane, uint lane) {{
    for (uint bz = 0; bz < gridDim.z; ++bz)
        for (uint by = 0; by < gridDim.y; ++by)
            for (uint bx = 0; bx < gridDim.x; ++bx) {{
                blockIdx = {{bx, by, bz}};
                if (one_lane) {{
                    threadIdx = {{lane, 0, 0}};
                    {call};
                    continue;
                }}
                for (uint z = 0; z < blockDim.z; ++z)
                    for (uint y = 0; y < blockDim.y; ++y)
                        for (uint x = 0; x < blockDim.x; ++x) {{
                            threadIdx = {{x, y, z}};
                            {call};
                        }}
            }}
}}

static void* lane_main(void* arg) {{
    // one warp per block: lane L walks every block in step with the other 31
    walk_blocks(true, (uint)(uintptr_t)arg);
    return nullptr;
}}

static void run_grid() {{
    blockDim = {{{tx}u, {ty}u, {tz}u}};
    gridDim = {{(g_grid[0] + {tx}u - 1) / {tx}u, (g_grid[1] + {ty}u - 1) / {ty}u,
               (g_grid[2] + {tz}u - 1) / {tz}u}};
    if ({"true" if src.simd else "false"}) {{
        shim_run_lanes(lane_main);
    }} else {{
        walk_blocks(false, 0);
    }}
}}
"""
    newline = "\n"
    return f"""#include "cuda_shim.h"
typedef unsigned int uint;
{_globals(launch)}
{src.cuda_header}

void body({", ".join(in_d + out_d)}) {{
{newline.join(consts)}
{src.cuda}
}}
{run}{_MAIN}"""


def _globals(launch: Launch) -> str:
    n_in, n_out = len(launch.inputs), len(launch.output_dtypes)
    return f"""
// buffers and grid, set by main() from argv (C headers only: a build takes well under a second)
#define N_IN {n_in}
#define N_OUT {n_out}
static char* g_in[N_IN];
static char* g_out[N_OUT];
static long g_out_size[N_OUT];
static unsigned g_grid[3];
"""


_MAIN = r"""
static char* read_file(const char* path) {
    FILE* f = fopen(path, "rb");
    if (!f) { perror(path); exit(3); }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char* buf = (char*)malloc(n > 0 ? n : 1);
    if (n > 0 && fread(buf, 1, n, f) != (size_t)n) { perror(path); exit(3); }
    fclose(f);
    return buf;
}

// argv: gx gy gz, N_IN input files, N_OUT (output file, byte size) pairs
int main(int argc, char** argv) {
    if (argc != 4 + N_IN + 2 * N_OUT) { fprintf(stderr, "bad argc\n"); return 2; }
    for (int i = 0; i < 3; ++i) g_grid[i] = (unsigned)strtoul(argv[1 + i], nullptr, 10);
    for (int i = 0; i < N_IN; ++i) g_in[i] = read_file(argv[4 + i]);
    for (int i = 0; i < N_OUT; ++i) {
        g_out_size[i] = strtol(argv[4 + N_IN + 2 * i + 1], nullptr, 10);
        g_out[i] = (char*)calloc(g_out_size[i] > 0 ? g_out_size[i] : 1, 1);
    }
    run_grid();
    for (int i = 0; i < N_OUT; ++i) {
        FILE* f = fopen(argv[4 + N_IN + 2 * i], "wb");
        if (!f || fwrite(g_out[i], 1, g_out_size[i], f) != (size_t)g_out_size[i]) return 4;
        fclose(f);
    }
    return 0;
}
"""


def build_dir() -> Path:
    d = Path(os.environ.get("LATENT_SHIM_CACHE", Path(tempfile.gettempdir()) / "latent-shim"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def compile_body(src: KernelSource, launch: Launch, dialect: str = "metal") -> Path:
    """Compile (or reuse) the binary for this body ("metal" or "cuda") and instantiation."""
    if not have_compiler():
        raise ShimError("g++ not found: the kernel shim needs a C++20 compiler")
    code = cpp_source(src, launch) if dialect == "metal" else cuda_cpp_source(src, launch)
    header = (SHIM_DIR / f"{dialect}_shim.h").read_text()
    key = hashlib.sha256("\0".join([code, header, " ".join(CXXFLAGS)]).encode()).hexdigest()[:20]
    exe = build_dir() / f"{src.name}-{dialect}-{key}"
    if exe.exists():
        return exe
    cpp = exe.with_suffix(".cpp")
    cpp.write_text(code)
    cxx = os.environ.get("CXX", "g++")
    tmp = exe.with_name(exe.name + f".tmp{os.getpid()}")
    proc = subprocess.run(
        [cxx, *CXXFLAGS, f"-I{SHIM_DIR}", str(cpp), "-o", str(tmp)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise ShimError(f"{src.name}: g++ failed:\n{proc.stderr[-4000:]}")
    os.replace(tmp, exe)  # atomic: parallel test runs never see a half-written binary
    return exe


def run_metal_body(src: KernelSource, launch: Launch) -> list[np.ndarray]:
    """Execute the Metal body over `launch.grid` on the CPU; outputs as numpy arrays."""
    return _run(src, launch, "metal")


def run_cuda_body(src: KernelSource, launch: Launch) -> list[np.ndarray]:
    """Execute the CUDA twin over `launch.grid` (in blocks of `launch.threadgroup`) on the CPU."""
    return _run(src, launch, "cuda")


def _run(src: KernelSource, launch: Launch, dialect: str) -> list[np.ndarray]:
    exe = compile_body(src, launch, dialect)
    with tempfile.TemporaryDirectory(prefix="latent-shim-run-") as tmp:
        argv = [str(exe), *(str(g) for g in launch.grid)]
        for i, a in enumerate(launch.inputs):
            path = Path(tmp, f"in{i}.bin")
            path.write_bytes(np.ascontiguousarray(np.array(a)).tobytes())
            argv.append(str(path))
        outs = []
        for i, (shape, dtype) in enumerate(zip(launch.output_shapes, launch.output_dtypes)):
            np_t = _NPTYPE[dtype]
            nbytes = int(np.prod(shape)) * np.dtype(np_t).itemsize
            path = Path(tmp, f"out{i}.bin")
            argv += [str(path), str(nbytes)]
            outs.append((path, shape, np_t))
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise ShimError(f"{src.name}: shim binary failed ({proc.returncode}): {proc.stderr}")
        return [np.fromfile(p, dtype=t).reshape(shape) for p, shape, t in outs]
