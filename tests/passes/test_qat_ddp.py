"""qat under torchrun: two processes (DDP, gloo on CPU) train as one process would on the
combined batches, and end with identical tensors."""

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

import qcompiler as qc
from tests.passes import qat_ddp_worker as worker


def test_two_processes_train_like_one_on_the_combined_batches(tmp_path):
    """torchrun --nproc_per_node=2: both ranks hold the same tensors after training, equal (to
    float rounding) to one process training on each step's two shards concatenated; rank 0
    wrote the checkpoint."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           worker.__file__, str(tmp_path)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert int(r0.pop("world_size")) == 2 and int(r1.pop("world_size")) == 2
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    assert sorted(os.listdir(tmp_path / "ck")) == ["qat-checkpoint.json", "qat-step0000006.safetensors"]

    ir, data = worker.setup()
    start = {k: v.clone() for k, v in ir.state_dict().items()}
    combined = [(torch.cat([data[2 * i][0], data[2 * i + 1][0]]), torch.cat([data[2 * i][1], data[2 * i + 1][1]]))
                for i in range(4)]
    qc.PassManager.parse(f"qat({worker.OPTIONS},distributed=off)").run(ir, qc.PassContext(train=combined))
    single = ir.state_dict()
    assert any(not torch.equal(single[k], start[k]) for k in start)
    for k in r0:
        assert torch.allclose(r0[k], single[k], atol=1e-5, rtol=1e-4), k
