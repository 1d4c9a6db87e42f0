"""What LoRA-SB's initialisation costs: peak memory against one training step, time against one epoch.

Every measurement runs in a fresh subprocess through the real CLI:
  * memory (SmolLM2 causal LM, same batch and length): `init --method sb` vs `train --max-steps 1`,
    each as peak RSS added over a process that only loaded the same model;
  * time (MiniLM on BBC News, the paper's "about 1% of an epoch"): `init --method sb` on N samples vs
    `train --epochs 1` on the whole training split, both from the commands' own JSON timings.

    python benchmarks/bench_sb_init.py [--samples 64] [--batch 8] [--length 128] [--rank 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

HWM = """
import json, sys, time
from pathlib import Path
def hwm():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
"""

LOADED = (
    HWM
    + """
from loraxs_cli.models import head_kwargs, load_model, load_tokenizer, resolve_model
resolved = resolve_model(sys.argv[1])
load_tokenizer(resolved)
load_model(resolved, **head_kwargs(sys.argv[2], None))
print(json.dumps({"peak": hwm()}))
"""
)

CLI = (
    HWM
    + """
import contextlib, io
from loraxs_cli.cli.app import main
sys.argv = ["loraxs", *sys.argv[1:]]
stdout = io.StringIO()
start = time.perf_counter()
with contextlib.redirect_stdout(stdout):
    try:
        main()
    except SystemExit as exit:
        assert not exit.code, exit.code
doc = json.loads(stdout.getvalue())
print(json.dumps({"peak": hwm(), "wall": time.perf_counter() - start, "doc": doc}))
"""
)


def run(script: str, *args, home: Path) -> dict:
    env = {**os.environ, "LORAXS_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          env=env, check=False)  # fmt: skip
    if done.returncode:
        raise SystemExit(f"benchmark step failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def memory(args, work: Path) -> None:
    from models_for_tests import bbc_split, smollm2_dir

    model = smollm2_dir()
    train, _ = bbc_split(16, 0)
    data = write_jsonl(work / "lm.jsonl", [{"text": r["text"]} for r in train])
    common = ["--rank", args.rank, "--max-length", args.length, "--json"]
    loaded = run(LOADED, model, "causal-lm", home=work / "home")["peak"]
    sb = run(CLI, "init", model, "--method", "sb", "--data", data, "--samples", args.batch,
             "--batch-size", args.batch, *common, home=work / "home")  # fmt: skip
    run(
        CLI, "init", model, "--rank", args.rank, "--json", home=work / "home"
    )  # the step below is a cache hit
    step = run(CLI, "train", model, "--data", data, "--out", work / "run", "--max-steps", 1,
               "--batch-size", args.batch, "--save-every", 0, *common, home=work / "home")  # fmt: skip
    mib = 1 << 20
    sb_added, step_added = (sb["peak"] - loaded) / mib, (step["peak"] - loaded) / mib
    print(f"SmolLM2-135M, batch {args.batch} x {args.length} tokens, rank {args.rank}")
    print("  (peak RSS added over a process that only loaded the model)")
    print(f"  model loaded:              {loaded / mib:8.0f} MiB")
    print(f"  LoRA-SB init (1 batch):    {sb_added:+8.0f} MiB  ({sb['doc'].get('seconds', 0):.1f} s, "
          f"{sb['doc']['sb']['samples']} samples, {len(sb['doc']['modules'])} accumulators)")  # fmt: skip
    print(f"  one training step:         {step_added:+8.0f} MiB")
    print(f"  ratio SB init / step:      {sb_added / step_added:8.2f}x")


def epoch_share(args, work: Path) -> None:
    from models_for_tests import bbc_split, minilm_dir

    model = minilm_dir()
    train, _ = bbc_split(400, 0)  # as many articles of each topic as there are (the smallest has 386)
    data = write_jsonl(work / "bbc.jsonl", train)
    common = ["--task", "seq-cls", "--rank", args.rank, "--max-length", args.length, "--json"]
    sb = run(CLI, "init", model, "--method", "sb", "--data", data, "--samples", args.samples,
             "--batch-size", args.batch, *common, home=work / "home")  # fmt: skip
    epoch = run(CLI, "train", model, "--data", data, "--out", work / "bbc-run", "--method", "sb",
                "--sb-samples", args.samples, "--sb-batch-size", args.batch, "--epochs", 1,
                "--batch-size", 16, "--save-every", 0, "--log-every", 50, *common,
                home=work / "home")  # fmt: skip
    init_s, epoch_s = sb["doc"]["seconds"], epoch["doc"]["seconds"]
    print(
        f"MiniLM on BBC News ({len(train)} articles, {epoch['doc']['steps']} steps of 16), rank {args.rank}"
    )
    print(f"  LoRA-SB init, {args.samples} samples: {init_s:8.1f} s")
    print(f"  one training epoch:         {epoch_s:8.1f} s")
    print(f"  init / epoch:               {init_s / epoch_s:8.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--only", choices=("memory", "time"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.only != "time":
            memory(args, Path(tmp))
        if args.only != "memory":
            epoch_share(args, Path(tmp))


if __name__ == "__main__":
    main()
