"""benchmarks.gpu needs a GPU: without CUDA it stops at once and says why; SDXL is not prepared yet."""

import pytest
import torch

from benchmarks import gpu


def test_without_cuda_it_stops_at_once_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        gpu.main(["--out", str(tmp_path)])
    assert "needs a CUDA GPU" in str(stop.value.code)  # a message, so exit status 1
    assert not any(tmp_path.iterdir())


def test_sdxl_says_it_is_not_prepared_yet_and_exits_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        gpu.main(["--family", "sdxl", "--out", str(tmp_path)])
    assert stop.value.code == 2
    assert "not prepared yet" in capsys.readouterr().err


def test_help_describes_the_run(capsys):
    with pytest.raises(SystemExit) as stop:
        gpu.main(["--help"])
    assert stop.value.code == 0
    assert "--family" in capsys.readouterr().out
