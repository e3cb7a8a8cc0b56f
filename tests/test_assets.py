"""sft/assets.py: the README's pictures are made again from committed files."""

import pytest

from sft import assets

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_results_csv_is_what_the_chart_reads_and_names_committed_sources():
    rows = assets.read_results(assets.ASSETS / "results.csv")
    assert [r["value"] for r in rows if r["setup"] == "2023 recipe"] == [4614.0, 74.4, 103.3, 110.0]
    for r in rows:  # every figure says which committed file under runs/ it comes from
        path = r["source"].split()[0]
        assert path.startswith("runs/") and (assets.REPO / path).is_file(), r


def test_the_three_pictures_are_written(tmp_path):
    assert assets.main([str(tmp_path)]) == 0
    for name in ("loss_curves.png", "results.png", "data_flow.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


def test_results_chart_follows_the_csv_and_bad_rows_are_named(tmp_path):
    good = tmp_path / "r.csv"
    good.write_text("metric,setup,value,unit,source\nspeed,2023 recipe,1,tok/s,x\nspeed,ours,3,tok/s,y\n")
    assert assets.results_chart(tmp_path / "r.png", good).read_bytes()[:8] == PNG_MAGIC
    bad = tmp_path / "bad.csv"
    bad.write_text("metric,setup,value,unit,source\nspeed,ours,fast,tok/s,y\n")
    with pytest.raises(ValueError, match=r"bad\.csv:2: value 'fast' is not a number"):
        assets.read_results(bad)
