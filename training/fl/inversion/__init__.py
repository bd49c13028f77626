"""The privacy audit: attack a site's own update and measure what an attacker could rebuild.

:func:`run_audit` takes the model a round starts from, some of a site's records and the job's
optimizer and privacy pipeline, and for each batch of audited records (one record per batch by
default, the strongest case)

1. trains **one local step exactly as the job would**: :func:`training.fl.local.train_local` on
   just that batch, one epoch with ``batch_size`` equal to the batch, the job's optimizer (fresh,
   as with momentum restart) and, when the pipeline holds ``dp_sgd``, its per-sample clipping
   and noise (Poisson sampling at rate ``B / B = 1`` takes the whole batch: the audited record
   is in the step, which is the case the guarantee has to cover);
2. applies the job's update filters with :func:`training.fl.filters.apply_pipeline`;
3. attacks what leaves the site, the filtered delta and its mask, knowing the start model and
   the learning rate, as the central server (or anyone who reads the update) could;
4. measures the reconstruction against the true record.

Only figures come out (:class:`AuditResult`, :meth:`AuditResult.to_json`): never a record or a
reconstruction, so a site can send its result like an update. :func:`reconstruction_picture`
draws a reconstruction, but only of a bundled set's public validation records (it takes a data
set key, not records). Plain PyTorch, no Django.

Decisions
---------
* **What the attacker sees.** The filtered delta and its mask: a coordinate that was not shared
  is unknown (it is 0 in the update, not a measurement of 0), so the attacks match shared
  coordinates only; excluded layers are absent. The attacker knows the start model, the
  architecture, the loss and the learning rate (all in the approved spec).
* **The attacker's gradient.** After one step of plain SGD from a fresh optimizer the delta is
  ``-lr * g`` (SGD with momentum too: its first step's buffer is the gradient), so the target
  gradient is ``delta / -lr`` and DLG matches it in squared distance. Adam's first step is
  ``-lr * m / (sqrt(v) + eps)``, about ``-lr * sign(g)`` per coordinate, so its delta keeps the
  gradient's signs and little of its scale; DP-SGD and the clipping filters rescale it too. In
  those cases (``"cosine"`` in the result's settings) both attacks match the delta's
  *direction* with the cosine distance, which is scale-free; for Adam that is weaker than an
  attack built on the sign, so the figures are then a lower bound of the risk. A kept optimizer
  state (momentum restart off) is not modelled: the audit is the first step of a round.
* **The attacks.** (a) DLG (Zhu et al. 2019): L-BFGS (strong Wolfe line search) on the gradient
  distance, jointly over a dummy input and a dummy soft label (a soft mask for segmentation).
  (b) Inverting gradients (Geiping et al. 2020): Adam on ``1 - cosine`` plus a total-variation
  prior for images, the input kept in the data's value range, the label fixed to the one
  inferred first; learning rate divided by 10 at 3/8, 5/8 and 7/8 of the iterations.
  (c) Label inference (iDLG, Zhao et al. 2020): with cross-entropy and one record, the gradient
  of the logits is ``softmax - onehot``, negative only at the true class, so the last linear
  layer's bias entry (or, if the bias is not shared, its weight row's sum over shared
  coordinates) is most negative there. With ``B`` records per batch the ``B`` most negative
  classes are taken. Its success rate is reported on its own. A model without a last linear
  layer (the U-Net's head is a convolution; masks are per pixel) skips label inference, and
  the attacks then optimise a soft label. (d) ``analytic``: when the first layer is linear on
  the flat record (logistic regression, MLP) and a step holds one record, its gradient row is
  ``dL/db_i * x`` (Geiping et al. 2020, section 3), so the least-squares ratio over the shared
  pairs reads the record off directly, with no optimisation; it needs the gradient's scale
  (plain SGD). Without it (d), one record in eight of an MLP on digits stayed in a local
  minimum of both (a) and (b) at the default iterations.
* **What bounded iterations mean.** Geiping et al. run thousands of iterations with restarts;
  the audit runs ``dlg_iterations`` and ``ig_iterations`` once. For the small classifiers that
  is enough (an unfiltered update gives SSIM 1.0 on digits); for the U-Net (a record of 32x32
  pixels, about 13 s of one CPU core at the defaults) the attacks do not converge, so a low
  figure there says these bounded attacks failed, not that the update is safe.
* **The attacker picks the best.** Per record the audit keeps the attack with the best figure
  measured against the true record. A real attacker cannot measure that, but could often tell
  by eye; taking the best makes the audit an upper bound of what these two attacks achieve,
  which is the side to err on for a site.
* **Bounded and seeded.** Iterations are bounded (:class:`AuditSettings`), so a record costs a
  few seconds on a CPU for the registry's models, and one ``seed`` fixes which records are
  audited, the training step's randomness, the pipeline's noise and the attacks' starting
  points. Dropout is off while attacking (the attacker cannot know the step's dropout draw).
* **Out of reach** (:class:`AuditOutOfReach`): more trainable parameters than
  ``max_parameters`` (the attacks differentiate the gradient, which costs a few passes of the
  whole model per iteration), more than ``max_batch_size`` records per step, records of more
  than ``max_input_values`` values, or a modality the audit does not know. The message says
  which and why.

Metrics
-------
Images are scaled to ``[0, 1]`` with the data's value range (the reconstruction clamped to it).
**SSIM** is Wang et al. (2004): a Gaussian window of 11x11 pixels with sigma 1.5, constants
``(0.01)^2`` and ``(0.03)^2``, the mean of the map over the "valid" positions, per channel then
averaged. An image smaller than 11 pixels a side uses the largest odd window that fits (7x7 for
the 8x8 digits) with the same sigma, its weights renormalised. **PSNR** is ``10 log10(1 / MSE)``,
capped at 100 dB (an exact copy has an infinite PSNR, which JSON cannot hold). **Dice** compares
the true mask's foreground with the attack's soft mask thresholded at 0.5 (argmax over the
classes). **Tabular** records are standardised with the mean and standard deviation of the
records given to the audit (a feature that never varies among them by the standard deviation of
all their values); the figures are the relative L2 error ``|x' - x| / |x|`` and the
share of features within ``feature_tolerance`` standard deviations. A record counts as rebuilt
at SSIM >= 0.5 (images), Dice >= 0.5 (a segmentation's mask, or SSIM >= 0.5 of its image) or
relative error <= 0.25 (tabular); :class:`AuditSettings` holds the thresholds.

The package's rooms: :mod:`~training.fl.inversion.settings` (what the audit may do, its limits,
:class:`AuditOutOfReach`), :mod:`~training.fl.inversion.metrics` (SSIM, PSNR, Dice),
:mod:`~training.fl.inversion.attacks` (the attacker's view and the attacks),
:mod:`~training.fl.inversion.audit` (:func:`run_audit` and the figures) and
:mod:`~training.fl.inversion.pictures` (a picture of public data only).
"""

from training.fl.inversion.audit import AuditResult, RecordFigures, run_audit
from training.fl.inversion.metrics import dice, psnr, ssim
from training.fl.inversion.pictures import BundledRecords, bundled_records, reconstruction_picture
from training.fl.inversion.settings import MODALITIES, AuditOutOfReach, AuditSettings

__all__ = [
    "MODALITIES",
    "AuditOutOfReach",
    "AuditResult",
    "AuditSettings",
    "BundledRecords",
    "RecordFigures",
    "bundled_records",
    "dice",
    "psnr",
    "reconstruction_picture",
    "run_audit",
    "ssim",
]
