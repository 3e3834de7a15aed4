"""Drawing primitives: one color per variant, valid PNGs."""

import pytest

from aoe.compare.report.curves import Band
from aoe.compare.report.figures import safe_name
from aoe.compare.report.plots import Palette, Series, line_plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
colormaps = pytest.importorskip("matplotlib").colormaps


def test_palette_gives_each_variant_one_color_in_order():
    tab10 = colormaps["tab10"]
    palette = Palette(["dense", "moe", "aoe"])
    assert palette("aoe") == tab10(2) and palette("dense") == tab10(0)
    assert palette("new") == tab10(3) and palette("new") == tab10(3)


def test_line_plot_with_log_axis_and_star(tmp_path):
    band = Band((1e-3, 3e-3, 1e-2), (4.8, 4.5, 4.7), (4.8, 4.5, 4.7), (4.8, 4.5, 4.7))
    path = line_plot([Series("MoE", "C1", band, star=(3e-3, 4.5))], tmp_path / "sweep.png", "sweep", "val loss",
                     xlabel="lr", markers=True, logx=True)
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = pytest.importorskip("matplotlib.image").imread(path)  # [H, W, RGBA] floats in [0, 1]
    assert image.shape[:2] == (462, 770)  # new_figure's 7.0 x 4.2 inches at 110 dpi
    rgb = image[..., :3]
    assert (rgb != rgb[0, 0]).any(axis=-1).mean() > 0.01  # not a blank canvas
    orange = (1.0, 127 / 255, 14 / 255)  # "C1", the series' color: its line is drawn
    assert (abs(rgb - orange).max(axis=-1) < 0.02).sum() > 100
    assert safe_name("moe/x y") == "moe_x_y"
