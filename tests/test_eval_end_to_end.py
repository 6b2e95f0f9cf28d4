import csv
import json

import numpy as np
import pytest
import torch

from helpers import save_networks, tiny_config
from vjepa_fast import checkpoint as ckpt
from vjepa_fast import cli
from vjepa_fast.eval.protocols import ProbeSettings
from vjepa_fast.eval.run import load_frozen
from vjepa_fast.eval.synthetic_benchmark import LOSS_WINDOW, run_synthetic_benchmark
from vjepa_fast.model import VJEPA
from vjepa_fast.synthetic import ensure_synthetic_dataset

TINY_DATA = dict(num_videos=16, frames=24, size=40)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny synthetic dataset and a tiny encoder checkpoint in our format (in a run directory)."""
    root = tmp_path_factory.mktemp("eval")
    data = ensure_synthetic_dataset(str(root / "data"), progress=False, **TINY_DATA)
    cfg = tiny_config()
    torch.manual_seed(0)
    model = VJEPA(cfg)
    path = root / "run" / "checkpoints" / "latest.pt"
    save_networks(model, cfg, path, step=7)
    return root, data, path


def _rows(path):
    """The CSV's rows without their wall-clock column."""
    with open(path) as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def test_eval_on_dataset_files_ours_and_official_format(tiny, tmp_path, capsys):
    root, data, path = tiny
    common = ["--train", data.motion_train_csv, "--val", data.motion_val_csv, "--epochs", "2", "--batch-size", "4",
              "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--workers", "0", "--no-progress"]
    assert cli.main(["eval", "--checkpoint", str(path), "--probe", "both", "--out-dir", str(tmp_path / "ours"),
                     *common]) == 0
    table = capsys.readouterr().out
    assert "attentive" in table and "linear" in table and "8 classes" in table
    ours = _rows(tmp_path / "ours" / "attentive.csv")
    assert [r["epoch"] for r in ours] == ["1", "2"] and ours[0]["val_top5"] != ""  # 8 classes: top-5 too
    assert len(_rows(tmp_path / "ours" / "linear.csv")) == 2

    official = tmp_path / "official.pth.tar"
    ckpt.export_official(ckpt.load_training_state(path), official)
    assert cli.main(["eval", "--checkpoint", str(official), "--num-frames", "4", "--num-heads", "2",
                     "--out-dir", str(tmp_path / "official"), *common]) == 0
    assert _rows(tmp_path / "official" / "attentive.csv") == ours  # same weights: same clips and features, same probe
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1  # val only: train clips are augmented every epoch

    assert cli.main(["eval", "--checkpoint", str(path), "--cached-train", "--out-dir", str(tmp_path / "cached"),
                     *common]) == 0  # ours: train on cached un-augmented train views
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2
    assert _rows(tmp_path / "cached" / "attentive.csv") != ours


def test_eval_on_an_image_folder(tiny, tmp_path, capsys):
    from PIL import Image

    _, _, path = tiny
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for label, colour in enumerate(([200, 30, 30], [30, 30, 200])):
            folder = tmp_path / "images" / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(colour, 20, size=(24, 36, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    assert cli.main(["eval", "--checkpoint", str(path), "--image-folder", str(tmp_path / "images"),
                     "--num-views", "3", "--epochs", "2", "--out-dir", str(tmp_path / "out"),
                     "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--workers", "0", "--no-progress"]) == 0
    assert "8 train / 4 val items, 2 classes" in capsys.readouterr().out
    rows = _rows(tmp_path / "out" / "attentive.csv")
    assert len(rows) == 2 and rows[0]["val_top5"] == ""  # 2 classes: no top-5
    # the official image protocol: batch 1024 (one step per epoch here), weight decay cosine from 0.001 to 1e-6
    assert float(rows[0]["weight_decay"]) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5, rel=1e-3)
    shapes = sorted(np.load(f, mmap_mode="r").shape for f in (tmp_path / "cache").glob("*.npy"))
    assert shapes == [(4, 3, 32, 32)]  # val only; 3 views, each image repeated into the encoder's 4 frames


def test_eval_errors_name_the_bad_input(tiny, tmp_path, capsys):
    _, data, path = tiny
    bad = tmp_path / "bad.csv"
    bad.write_text("videos/00000.webm motion\n")
    assert cli.main(["eval", "--checkpoint", str(path), "--train", str(bad), "--val", data.motion_val_csv,
                     "--no-progress"]) == 2
    assert "bad.csv, line 1" in capsys.readouterr().err
    assert cli.main(["eval", "--checkpoint", str(path), "--train", data.motion_train_csv]) == 2
    assert "--val" in capsys.readouterr().err


def test_synthetic_benchmark_end_to_end(tiny, tmp_path):
    root, _, path = tiny
    losses = np.linspace(0.9, 0.4, 2 * LOSS_WINDOW)
    (path.parent.parent / "metrics.csv").write_text("step,loss\n" + "".join(f"{i},{v}\n" for i, v in enumerate(losses)))
    report = run_synthetic_benchmark(load_frozen(str(path)), out_dir=str(tmp_path / "bench"),
                                     cache_dir=str(tmp_path / "cache"),
                                     settings=ProbeSettings(epochs=1, batch_size=4), num_workers=0, progress=False,
                                     dataset_root=str(root / "data"), dataset_kwargs=TINY_DATA)
    assert [e.name for e in report.encoders] == ["pretrained", "random init"] and report.encoders[0].steps == 7
    for e in report.encoders:
        assert set(e.top1) == {"motion/attentive", "motion/linear", "appearance/attentive", "appearance/linear"}
        assert 0 < e.token_spread < 1 and 0 < e.clip_spread < 1
    assert report.checks["health: loss fell clearly"] is True
    assert report.loss_first == pytest.approx(losses[:LOSS_WINDOW].mean())
    assert "random init" in report.table() and "checks:" in report.table()
    assert json.loads((tmp_path / "bench" / "benchmark.json").read_text())["encoders"][0]["steps"] == 7
    assert len(list((tmp_path / "bench").glob("*.csv"))) == 8
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 4  # 2 encoders x (train, val); labels share them
