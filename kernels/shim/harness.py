"""Run a Metal kernel body on the CPU: wrap it in a C++ function, compile with g++, execute.

`run_metal_body(src, launch)` takes the very `KernelSource` string the Python wrapper hands to
`mx.fast.metal_kernel` and the very `Launch` (inputs, template values, grid) the wrapper builds,
so what is tested is what would run on a Mac. `metal_shim.h` supplies the Metal built-ins.
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

from kernels._common import KernelSource, Launch

SHIM_DIR = Path(__file__).resolve().parent
CXXFLAGS = ["-O2", "-std=c++20", "-ffp-contract=off", "-pthread"]

_CTYPE = {
    mx.uint8: "uint8_t",
    mx.uint32: "uint32_t",
    mx.int32: "int32_t",
    mx.float32: "float",
    mx.float16: "half",
}
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


def _ctype(dtype: mx.Dtype) -> str:
    if dtype not in _CTYPE:
        raise ShimError(f"the shim has no C++ type for {dtype}")
    return _CTYPE[dtype]


def cpp_source(src: KernelSource, launch: Launch) -> str:
    """The C++ translation unit: shim header, the body wrapped as a template function, a main."""
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
    args = [f"const device {_ctype(a.dtype)}* {n}" for n, a in zip(src.input_names, launch.inputs)]
    args += [f"device {_ctype(d)}* {n}" for n, d in zip(src.output_names, launch.output_dtypes)]
    args.append("uint3 thread_position_in_grid")
    template = f"template <{', '.join(tparams)}>\n" if tparams else ""
    call_args = [f"({_ctype(a.dtype)}*)in[{i}].data()" for i, a in enumerate(launch.inputs)]
    call_args += [f"({_ctype(d)}*)out[{i}].data()" for i, d in enumerate(launch.output_dtypes)]
    call = f"body{'<' + ', '.join(targs) + '>' if targs else ''}({', '.join(call_args)}, p)"
    n_in, n_out = len(launch.inputs), len(launch.output_dtypes)
    return f"""#include "metal_shim.h"

{src.metal_header}

{template}void body({", ".join(args)}) {{
{src.metal}
}}

#undef device
#undef constant
#undef threadgroup
#undef thread

static std::vector<char> read_file(const char* path) {{
    std::ifstream f(path, std::ios::binary);
    return std::vector<char>(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}}

// argv: gx gy gz, {n_in} input files, {n_out} (output file, byte size) pairs
int main(int argc, char** argv) {{
    if (argc != 4 + {n_in} + 2 * {n_out}) {{ std::fprintf(stderr, "bad argc\\n"); return 2; }}
    uint gx = std::stoul(argv[1]), gy = std::stoul(argv[2]), gz = std::stoul(argv[3]);
    std::vector<std::vector<char>> in, out;
    for (int i = 0; i < {n_in}; ++i) in.push_back(read_file(argv[4 + i]));
    for (int i = 0; i < {n_out}; ++i) out.emplace_back(std::stoul(argv[4 + {n_in} + 2 * i + 1]), 0);
    if ({"true" if src.simd else "false"}) {{
        // lanes are threads; simdgroups (32 consecutive x) run one after another
        std::barrier<> bar(shim::kSimdWidth);
        shim::g_barrier = &bar;
        std::vector<std::thread> lanes;
        for (uint lane = 0; lane < (uint)shim::kSimdWidth; ++lane) {{
            lanes.emplace_back([&, lane] {{
                shim::t_lane = lane;
                for (uint z = 0; z < gz; ++z)
                    for (uint y = 0; y < gy; ++y)
                        for (uint x0 = 0; x0 < gx; x0 += shim::kSimdWidth) {{
                            uint3 p{{x0 + lane, y, z}};
                            {call};
                        }}
            }});
        }}
        for (auto& t : lanes) t.join();
    }} else {{
        for (uint z = 0; z < gz; ++z)
            for (uint y = 0; y < gy; ++y)
                for (uint x = 0; x < gx; ++x) {{
                    uint3 p{{x, y, z}};
                    {call};
                }}
    }}
    for (int i = 0; i < {n_out}; ++i) {{
        std::ofstream f(argv[4 + {n_in} + 2 * i], std::ios::binary);
        f.write(out[i].data(), out[i].size());
    }}
    return 0;
}}
"""


def build_dir() -> Path:
    d = Path(os.environ.get("LATENT_SHIM_CACHE", Path(tempfile.gettempdir()) / "latent-shim"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def compile_body(src: KernelSource, launch: Launch) -> Path:
    """Compile (or reuse) the binary for this body and template instantiation."""
    if not have_compiler():
        raise ShimError("g++ not found: the Metal shim needs a C++20 compiler")
    code = cpp_source(src, launch)
    header = (SHIM_DIR / "metal_shim.h").read_text()
    key = hashlib.sha256("\0".join([code, header, " ".join(CXXFLAGS)]).encode()).hexdigest()[:20]
    exe = build_dir() / f"{src.name}-{key}"
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
    exe = compile_body(src, launch)
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
