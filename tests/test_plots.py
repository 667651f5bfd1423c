import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from medlab import plots  # noqa: E402
from medlab.augment import single_augmentations  # noqa: E402
from medlab.data import load_dataset  # noqa: E402


@pytest.fixture(scope="module")
def dataset():
    return load_dataset("synthetic-4class", image_size=32, max_images_per_split=40, progress=False)


def test_every_eda_figure_draws_and_saves(dataset, tmp_path):
    figures = {
        "counts": plots.plot_class_counts(dataset),
        "samples": plots.plot_sample_grid(dataset, per_class=3, show_masks=True),
        "intensities": plots.plot_intensity_histograms(dataset),
        "means": plots.plot_mean_images(dataset),
        "augment": plots.plot_augmentation_grid(dataset.train.images[:2], single_augmentations(), draws=2),
        "batch": plots.plot_image_batch(dataset.train.images[:10].astype("float32"), dataset.train.labels[:10],
                                        dataset.info.class_names),
    }
    for name, figure in figures.items():
        path = plots.save_figure(figure, tmp_path, name)
        assert path.exists() and path.stat().st_size > 1000
    assert len(figures["samples"].axes) == 4 * 3
    assert any("SYNTHETIC" in text.get_text() for text in figures["counts"].texts)
    assert plots.save_figure(figures["counts"], "", "nothing") is None
    assert plots.plot_source_sizes(dataset) is None  # arrays have no source sizes


def test_history_draws_train_and_validation_per_member():
    import matplotlib.pyplot as plt
    import pandas as pd

    epochs = pd.RangeIndex(1, 4, name="epoch")
    one = pd.DataFrame({"loss": [0.6, 0.4, 0.3], "val_loss": [0.7, 0.5, 0.45],
                        "auc": [0.7, 0.8, 0.9], "val_auc": [0.65, 0.75, 0.8]}, index=epochs)
    figure = plots.plot_history(one)
    assert [len(axis.lines) for axis in figure.axes] == [2, 2]  # loss and auc: train and validation
    members = pd.concat([one.assign(member=0), one.assign(member=1000)])
    figure = plots.plot_history(members)
    assert [len(axis.lines) for axis in figure.axes] == [4, 4]
    labels = [line.get_label() for line in figure.axes[0].lines]
    assert labels == ["train (seed 0)", "validation (seed 0)", "train (seed 1000)", "validation (seed 1000)"]
    plt.close("all")


def test_gallery_groups_binary_and_per_class():
    labels = np.array([1, 1, 0, 0, 1, 0])
    predicted = np.array([1, 0, 1, 0, 1, 0])
    binary = plots.gallery_indices(labels, predicted, per_group=5, seed=0)
    assert {k: v.tolist() for k, v in binary.items()} == {
        "true positive": [0, 4], "false negative": [1], "false positive": [2]}
    names = ["glioma", "meningioma", "notumor"]
    labels = np.array([0, 0, 1, 1, 2, 2, 0])
    predicted = np.array([0, 1, 1, 1, 2, 0, 2])
    groups = plots.gallery_indices(labels, predicted, per_group=1, seed=0, class_names=names)
    assert list(groups) == [f"{n}: {kind}" for n in names for kind in ("correct", "confused")]
    assert groups["glioma: correct"].tolist() == [0] and groups["meningioma: confused"].tolist() == []
    assert groups["notumor: confused"].tolist() == [5] and len(groups["glioma: confused"]) == 1
    titles = plots.gallery_titles(groups, predicted, names)
    assert titles[0] == "glioma: correct" and "notumor as glioma" in titles
    assert titles[1] in {"glioma as meningioma", "glioma as notumor"} and len(titles) == 5


def test_figures_describe_themselves_for_alternative_text():
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2)
    figure.suptitle("Curves")
    left.set_title("ROC")
    left.set_xlabel("false positive rate")
    left.set_ylabel("recall")
    left.plot([0, 1], [0, 1], label="AUC 0.98")
    left.legend()
    right.imshow(np.zeros((4, 4)))
    figure.text(0.9, 0.0, "SYNTHETIC DATA")
    assert plots.describe_figure(figure) == ("Figure: Curves. Panels: ROC (x: false positive rate; y: recall; "
                                             "legend: AUC 0.98). 1 image panel(s). SYNTHETIC DATA")
    many, axes = plt.subplots(1, 8)
    for index, axis in enumerate(axes):
        axis.set_title(f"image {index}" if index < 4 else "missed")  # a gallery: four titled, four alike
    assert plots.describe_figure(many, max_panels=2) == "Figure. Panels: image 0; image 1; and 3 more."
    assert plots.describe_figure(many, max_panels=5).endswith("image 3; missed (x4).")
    plt.close("all")


def test_a_kernels_png_output_of_a_figure_carries_its_alternative_text():
    """What show_alt_text does in a Jupyter kernel, on IPython's own formatters (outside a kernel it does nothing)."""
    import matplotlib.pyplot as plt
    from IPython.core.formatters import DisplayFormatter
    from IPython.core.pylabtools import print_figure, retina_figure
    from matplotlib.figure import Figure

    assert plots.show_alt_text() is False  # no IPython shell here
    formatter = DisplayFormatter()
    png = formatter.formatters["image/png"]
    assert plots._wrap_png_printer(png) is False  # nothing to wrap before the inline backend registers its printer
    png.for_type(Figure, lambda figure: print_figure(figure, "png"))  # as matplotlib_inline does
    assert plots._wrap_png_printer(png) and plots._wrap_png_printer(png)  # wrapped once, however often called
    figure, axis = plt.subplots()
    axis.set_title("Images per class")
    data, metadata = formatter.format(figure, include={"image/png"})
    assert data["image/png"][:4] == b"\x89PNG"
    assert metadata["image/png"]["alt"] == "Figure. Panels: Images per class."
    png.for_type(Figure, lambda figure: retina_figure(figure))  # "retina": PNG and its size
    assert plots._wrap_png_printer(png)
    data, metadata = formatter.format(figure, include={"image/png"})
    assert metadata["image/png"]["alt"] == "Figure. Panels: Images per class." and "width" in metadata["image/png"]
    plt.close("all")
