import pytest

import crossent.torch._chunked as chunked


@pytest.fixture(params=["big-blocks", "tiny-blocks", "tiny-blocks-all-rows"])
def block_setting(request, monkeypatch):
    """Run impl="chunked" with one block, with blocks of a few rows, and on the all-rows path.

    "tiny-blocks-all-rows" turns off the CPU's gathering of non-ignored rows, so the path that
    accelerator tensors take (every row processed, ignored rows zeroed) runs on the CPU too.
    """
    if request.param != "big-blocks":
        monkeypatch.setattr(chunked, "DEFAULT_BLOCK_ELEMENTS", 24)
    if request.param == "tiny-blocks-all-rows":
        monkeypatch.setattr(chunked, "COMPACT_IGNORED_ROWS_ON_CPU", False)
    return request.param
