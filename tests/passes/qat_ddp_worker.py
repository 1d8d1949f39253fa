"""The process test_qat_ddp starts twice under torchrun: each trains the same W4A4 MLP IR on
its share of the batches (DDP over gloo) and saves the tensors it ends with."""

import sys

import torch
from safetensors.torch import save_file

import qcompiler as qc
from qcompiler import zoo

OPTIONS = "steps=6,lr=1e-2,loss=task,quantizers=lsq,damp=0.01"


def setup():
    """The IR (fake-quant W4A4, calibrated) and 8 labelled batches, identical in every process."""
    torch.manual_seed(0)
    model = zoo.MLP(d_in=8, hidden=16, d_out=4).eval()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(8)]
    ir = qc.trace(model, (data[0][0][:2],))
    qc.PassManager.parse("fake-quant(w=4,a=4),calibrate").run(ir, qc.PassContext(calib=[d for d, _ in data], verify=False))
    return ir, data


if __name__ == "__main__":
    out = sys.argv[1]
    ir, data = setup()
    ctx = qc.PassContext(train=data)
    qc.PassManager.parse(f"qat({OPTIONS},checkpoint_dir={out}/ck,checkpoint_every=3)").run(ir, ctx)
    rank, world = torch.distributed.get_rank(), ctx.results[-1][1].details["world_size"]
    tensors = {k: v.detach().contiguous() for k, v in ir.state_dict().items()}
    tensors["world_size"] = torch.tensor(world)
    save_file(tensors, f"{out}/rank{rank}.safetensors")
    torch.distributed.destroy_process_group()
