"""Dataset files in the official `path label` format."""
import os

import numpy as np
import pytest

from vjepa_fast.dali_pipelines import read_dataset_files


def test_paths_resolve_against_the_file_folder_and_files_concatenate(tmp_path):
    (tmp_path / "sub").mkdir()
    first = tmp_path / "sub" / "a.csv"
    first.write_text("videos/x.webm 3\n\n/abs/y.mp4 -1\n")
    second = tmp_path / "b.csv"
    second.write_text("z.webm 7")
    index = read_dataset_files([str(first), str(second)])
    assert index.paths == (os.path.join(tmp_path, "sub", "videos/x.webm"), "/abs/y.mp4",
                           os.path.join(tmp_path, "z.webm"))
    np.testing.assert_array_equal(index.labels, [3, -1, 7])
    assert index.labels.dtype == np.int64 and index.probabilities is None and len(index) == 3
    assert read_dataset_files(str(second)).paths == (os.path.join(tmp_path, "z.webm"),)  # a lone path is fine


def test_weights_give_each_file_its_share(tmp_path):
    big = tmp_path / "big.csv"
    big.write_text("".join(f"v{i}.webm 0\n" for i in range(6)))
    small = tmp_path / "small.csv"
    small.write_text("w.webm 1\nu.webm 1\n")
    index = read_dataset_files([str(big), str(small)], weights=[1.0, 3.0])
    np.testing.assert_allclose(index.probabilities, [0.25 / 6] * 6 + [0.375] * 2)
    with pytest.raises(ValueError, match="2 dataset files"):
        read_dataset_files([str(big), str(small)], weights=[1.0])
    with pytest.raises(ValueError, match="small.csv"):
        read_dataset_files([str(big), str(small)], weights=[1.0, -1.0])


@pytest.mark.parametrize("content,message", [
    ("a.webm 1\nb.webm\n", "line 2: expected 'path label'"),
    ("a.webm 1\n\nc.webm two\n", "line 3: label 'two' is not an integer"),
    ("a.webm 1.5\n", "line 1: label '1.5'"),
    ("my video.webm 1\n", "line 1: expected 'path label'"),
])
def test_malformed_line_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        read_dataset_files([str(path)])
    assert str(path) in str(error.value)


def test_unreadable_line_names_file_and_line(tmp_path):
    path = tmp_path / "bytes.csv"
    path.write_bytes(b"a.webm 1\n\xff\xfe\x00garbage 2\n")
    with pytest.raises(ValueError, match="line 2: not UTF-8") as error:
        read_dataset_files([str(path)])
    assert str(path) in str(error.value)


def test_empty_dataset_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("\n  \n")
    with pytest.raises(ValueError, match="empty.csv lists no videos"):
        read_dataset_files([str(path)])
