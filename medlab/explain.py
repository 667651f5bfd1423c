"""Grad-CAM: where in the image did the model look?

Grad-CAM (Selvaraju et al., 2017) weights the feature maps of a convolution
layer by how strongly the predicted score depends on them, giving a coarse
heatmap of the evidence for a class. It needs the layer to be reachable from
the model's input, which is why medlab builds transfer models as one flat
graph.

Two checks keep the heatmaps honest:

- **pointing game** (synthetic data, which has lesion masks): the share of
  images whose heatmap peak falls inside the lesion. Chance is the share a
  peak placed uniformly at random would hit: the mean fraction of the image
  the lesion mask covers.
- **model randomisation** (Adebayo et al., 2018): heatmaps of the same
  architecture with re-initialised weights must differ from the trained
  model's; if they do not, the heatmap shows the architecture, not what the
  model learned.
"""

from __future__ import annotations

import weakref

import keras
import numpy as np
import tensorflow as tf

from medlab.models import gradcam_layer_names

_PROBES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {layer name: probe model}


def gradcam(model: keras.Model, images: np.ndarray, layer_name: str | list[str] | None = None,
            class_index: int | None = None, batch_size: int = 32) -> np.ndarray:
    """Heatmaps in [0, 1], shape (N, H, W) at the input resolution.

    Args:
        layer_name: convolution layer to explain, or several; default the
            model's last one, or for an averaged model (see
            :func:`medlab.models.average_models`) each member's last one.
            Several layers are explained together, as if their feature maps
            were one layer: the members' weighted maps are summed before the
            ReLU, which is Grad-CAM of the averaged logit.
        class_index: the class whose evidence is shown; default the positive
            class for a sigmoid model and the predicted class for a softmax.
    """
    names = tuple([layer_name] if isinstance(layer_name, str) else (layer_name or gradcam_layer_names(model)))
    probes = _PROBES.setdefault(model, {})
    if names not in probes:  # building the probe model costs more than a small batch
        probes[names] = keras.Model(model.inputs, [[model.get_layer(name).output for name in names], model.output])
    probe = probes[names]
    heatmaps = []
    for start in range(0, len(images), batch_size):
        batch = tf.convert_to_tensor(np.asarray(images[start:start + batch_size], dtype="float32"))
        with tf.GradientTape() as tape:
            feature_maps, predictions = probe(batch, training=False)
            # Log-odds / log-probability rather than the probability itself: a confident
            # sigmoid or softmax saturates, and its gradient (hence the heatmap) vanishes.
            probabilities = tf.clip_by_value(predictions, 1e-7, 1.0 - 1e-7)
            if predictions.shape[-1] == 1:
                logit = tf.math.log(probabilities[:, 0]) - tf.math.log(1.0 - probabilities[:, 0])
                score = logit if class_index in (None, 1) else -logit
            else:
                chosen = tf.argmax(predictions, axis=-1) if class_index is None else \
                    tf.fill([tf.shape(predictions)[0]], tf.cast(class_index, tf.int64))
                score = tf.math.log(tf.gather(probabilities, chosen, axis=1, batch_dims=1))
        gradients = tape.gradient(score, feature_maps)
        weighted = 0.0
        rows = batch.shape[0]  # a member on stacked test-time views has one row per view: the first view is the image
        feature_maps, gradients = [maps[:rows] for maps in feature_maps], [grads[:rows] for grads in gradients]
        for maps, grads in zip(feature_maps, gradients):  # summed at the first layer's resolution
            weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
            layer_map = tf.reduce_sum(weights * maps, axis=-1)[..., None]
            if layer_map.shape[1:3] != feature_maps[0].shape[1:3]:
                layer_map = tf.image.resize(layer_map, feature_maps[0].shape[1:3], method="bilinear")
            weighted += layer_map
        cam = tf.image.resize(tf.nn.relu(weighted), batch.shape[1:3], method="bilinear")[..., 0]
        peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
        heatmaps.append((cam / tf.maximum(peak, 1e-12)).numpy())
    return np.concatenate(heatmaps)


def pointing_game(heatmaps: np.ndarray, masks: np.ndarray, tolerance: int = 0) -> dict[str, float]:
    """Share of images whose heatmap maximum lies inside the lesion mask, and the chance level.

    ``tolerance`` (pixels) grows each mask before scoring, as the original
    pointing game does (15 px at 224 px) to forgive the coarse resolution of
    late convolution layers. Chance is computed with the same grown masks:
    the mean share of the image they cover, i.e. the hit rate of a peak
    placed uniformly at random.
    """
    from scipy import ndimage

    if heatmaps.shape != masks.shape:
        raise ValueError(f"heatmaps {heatmaps.shape} and masks {masks.shape} differ in shape")
    has_lesion = masks.reshape(len(masks), -1).any(axis=1)
    if not has_lesion.any():
        raise ValueError("no image has a lesion mask")
    grown = masks[has_lesion].astype(bool)
    if tolerance > 0:
        structure = ndimage.iterate_structure(ndimage.generate_binary_structure(2, 1), tolerance)
        grown = np.stack([ndimage.binary_dilation(mask, structure) for mask in grown])
    hits = []
    for heatmap, mask in zip(heatmaps[has_lesion], grown):
        peak = np.unravel_index(np.argmax(heatmap), heatmap.shape)
        hits.append(bool(mask[peak]))
    return {
        "hit_rate": float(np.mean(hits)),
        "chance": float(grown.reshape(len(grown), -1).mean()),
        "images": int(has_lesion.sum()),
        "tolerance_px": int(tolerance),
    }


def randomised_copy(model: keras.Model, seed: int = 0) -> keras.Model:
    """The same architecture with freshly initialised weights (for the randomisation check)."""
    keras.utils.set_random_seed(seed)
    copy = keras.models.clone_model(model)
    for source, target in zip(model.layers, copy.layers):
        if source.weights and not source.trainable_weights:  # fixed preprocessing, e.g. Normalization
            target.set_weights(source.get_weights())
            if hasattr(target, "finalize_state"):  # Normalization derives its mean/variance from these
                target.finalize_state()
    return copy


def randomisation_check(model: keras.Model, images: np.ndarray, layer_name: str | None = None,
                        seed: int = 0) -> dict[str, float]:
    """Mean Spearman correlation between trained-model and random-model heatmaps (low is good)."""
    from scipy.stats import spearmanr

    trained = gradcam(model, images, layer_name)
    random = gradcam(randomised_copy(model, seed), images, layer_name)
    correlations = []
    for a, b in zip(trained, random):
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            correlations.append(0.0)
            continue
        correlations.append(float(spearmanr(a.ravel(), b.ravel()).statistic))
    return {"mean_spearman": float(np.mean(correlations)), "images": len(images)}
