"""Fine-tuning on the user's own documents (and the training loop pre-training reuses).

`data` turns a folder into token chunks with loss masks; `lora` adds, saves, loads, fuses and
exports LoRA/QLoRA adapters; `trainer` runs, checkpoints and resumes training as a stream of
`TrainEvent`s. Submodules are imported on use so `import engine.train` stays cheap.
"""
