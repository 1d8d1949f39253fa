"""Scripting the pass pipeline: build it from text or from pass objects, print the IR after
every pass, then compile the converted IR for the host and check the generated code
reproduces the IR exactly.

    python examples/pipeline_scripting.py
"""

from __future__ import annotations

import os


import torch  # noqa: E402

import qcompiler as qc  # noqa: E402
from qcompiler import zoo  # noqa: E402
from qcompiler.backends.host import HostRunner, build  # noqa: E402
from qcompiler.passes.calibrate import Calibrate  # noqa: E402
from qcompiler.passes.convert import Convert  # noqa: E402
from qcompiler.passes.fake_quant import FakeQuant  # noqa: E402
from qcompiler.report import sqnr_db  # noqa: E402


TEXT = "fake-quant(w=8,a=8),calibrate(observer=mse),convert"


def main() -> None:
    torch.manual_seed(0)
    model = zoo.MLP(d_in=16, hidden=32, d_out=4).eval()
    x = torch.randn(8, 16)
    calib = [torch.randn(32, 16) for _ in range(4)]

    # The same pipeline, from text and from pass objects; str() prints canonical text
    # (options equal to their defaults are left out) that parses back to itself.
    from_text = qc.PassManager.parse(TEXT)
    from_objects = qc.PassManager([FakeQuant(w=8, a=8), Calibrate(observer="mse"), Convert()])
    canonical = str(from_text)
    print(f"text:      {TEXT}\ncanonical: {canonical}\nobjects:   {from_objects}")
    assert str(from_objects) == canonical
    assert str(qc.PassManager.parse(canonical)) == canonical
    print("round trip: ok\n")

    # Run it on the traced MLP, printing the IR after each pass.
    ir = qc.trace(model, (x,))
    ctx = qc.PassContext(calib=calib, print_ir_after="all")
    from_objects.run(ir, ctx)
    print("\npass timings: " + ", ".join(f"{name} {t * 1e3:.1f} ms" for name, t in ctx.timings))

    # Compile the converted IR with TVM and compare with the IR run in torch.
    runner = HostRunner(build(ir, (x,)))
    (got,) = runner(x)
    with torch.no_grad():
        want, ref = ir(x), model(x)
    exact = torch.equal(got, want)
    print(f"\nhost code vs IR: max |diff| = {(got - want).abs().max().item():g}, bit-exact: {exact}")
    print(f"int8 IR vs float model: SQNR {sqnr_db(ref, want):.1f} dB")
    assert exact, "the generated code should reproduce the IR exactly for the MLP"


if __name__ == "__main__":
    main()
