"""qcompiler's passes, one module per pass family; importing this package registers them."""

from . import calibrate, convert, fake_quant, fold_batchnorm  # noqa: F401
