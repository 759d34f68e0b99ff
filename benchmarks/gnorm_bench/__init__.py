"""Side-by-side benchmark of ``gnorm.group_norm`` (issue #5).

Compares gnorm, by its default XLA path (``gnorm``) and by its Pallas kernels
(``gnorm_pallas``: ``implementation="pallas"``, two Triton kernels for the
forward, XLA's backward), with ``flax.linen.GroupNorm`` and, when they are importable,
haiku's ``hk.GroupNorm``, equinox's ``eqx.nn.GroupNorm`` and torch's native
``torch.nn.functional.group_norm``, plus XLA's floor for the same tensor: one
elementwise pass that reads ``x`` once and writes ``y`` once,
``jax.jit(lambda x, g, b: x * g + b)``. It runs as it is on JAX's CPU, GPU or
TPU backend (``jax.default_backend()``); torch is compared on the CPU, and on
a GPU where ``torch.cuda.is_available()``. Off a GPU the Pallas kernels run
in Pallas's interpreter, whose times mean nothing: ``gnorm_pallas`` is then
skipped ("Pallas kernels run in the interpreter on cpu: not timed", in
``latest.json``'s ``skipped``) unless ``--only`` names it, which CI does on
the quick shape to exercise its plumbing. A Pallas variant that fails to
compile is dropped from that shape, its error kept in the case's ``errors``
(failing the accuracy target), so that a GPU session measures the others.

What is measured, per shape:

* forward: the jitted function, ``y = f(x, gamma, beta)``;
* forward+backward: the jitted ``y, vjp = jax.vjp(f, x, gamma, beta)`` followed
  by ``vjp(ct)`` for a fixed random cotangent ``ct``, returning ``y`` and the
  gradients for ``x``, ``gamma`` and ``beta`` (what ``jax.grad`` of
  ``sum(y * ct)`` computes, but with ``y`` also returned, as a training step
  needs it and as torch's autograd produces it);
* each timing is the median over rounds; within a round every implementation
  is timed back to back (in a rotating order), so noise on a shared machine
  hits them all alike. One sample is ``k`` blocked calls (JAX:
  ``block_until_ready``; torch on CUDA: ``torch.cuda.synchronize()``), ``k``
  chosen so a sample lasts about ``--sample-ms``;
* ratios: time / floor (the floor is always the *forward* one-pass time, in
  both tables), flax / gnorm and torch / gnorm (> 1: gnorm faster),
  gnorm_pallas / gnorm (< 1: the Pallas kernels faster), and their geometric
  means;
* achieved bandwidth: the bytes a pass must move (forward: read ``x``, write
  ``y``; forward+backward: also read ``dy`` and write ``dx``; in the dtypes the
  implementation reads and writes, ``gamma`` and ``beta`` ignored) / the median
  time, in GB/s and as a fraction of the device's copy bandwidth, measured in
  the same run: ``jax.jit(lambda x: x + 0)`` on a buffer far beyond the caches
  (256 MiB on an accelerator; 64 MiB on the CPU, where page faults of the
  fresh output set its time: see ``machine.COPY_MIB``), bytes read + written;
* compile time: wall time of ``jax.jit(f).lower(...).compile()`` on a fresh
  function object (median of ``--compile-reps``; the process is warm, so this
  is not the cold first compile of the process);
* memory: ``compiled.memory_analysis().temp_size_in_bytes`` of the jitted
  forward+backward, and the residuals the backward keeps alive: the array
  leaves of the ``jax.vjp`` function (``jax.tree_util.tree_leaves(vjp_fn)``,
  listed by tracing it with ``jax.make_jaxpr``, which also tells which leaf is
  the input ``x`` itself), total bytes and bytes other than ``x``;
  ``compiled.cost_analysis()['bytes accessed']``, XLA's traffic estimate;
* accuracy: every implementation's ``y`` and gradients are compared with
  gnorm's and with a float64 NumPy reference, with the same ``eps`` (1e-5) for
  all, so a fast but wrong kernel cannot win silently.

A second section (issue #7), "Fused GroupNorm + SiLU", runs on diffusion-UNet
shapes ((2, 64, 64, 320) and (2, 32, 32, 640), float32 and bfloat16, G=32):
gnorm's fused ``group_norm(p, x, G, activation="silu")`` (and, with
``gnorm_pallas``, the same with ``implementation="pallas"``:
``gnorm_pallas_fused``) against
``jax.nn.silu(group_norm(p, x, G))``, ``jax.nn.silu`` after flax's GroupNorm
and ``F.silu(F.group_norm(...))`` in torch's faster layout, with the floor as
above. Same timing method; compiled temp bytes of the forward and
forward+backward (one compilation each, no compile times); the residuals the
backward keeps (torch: the tensors autograd saves, through
``torch.autograd.graph.saved_tensors_hooks``); accuracy against the float64
reference of ``silu(group_norm(x))``.

Issue #13's targets for the Pallas kernels (set for an H100) are rows of the
target checks (``pallas_targets``), each on every shape: forward <= 1.5x the
time to copy ``x`` once (its bytes read and written at the copy bandwidth),
forward+backward <= 1.5x the time to move 5 x-sizes at that bandwidth, fused
GroupNorm + SiLU forward+backward >= 2x faster than flax's GroupNorm followed
by ``jax.nn.silu`` (fused section), and faster than torch's faster layout,
forward and forward+backward. Off a GPU (or without the implementations they
compare) their ``met`` is None: "not applicable".

``--cases sd-unet`` replaces both sections' shapes by those of a Stable
Diffusion UNet: (2, 64, 64, 320), (2, 32, 32, 640), (2, 16, 16, 1280) and
(8, 56, 56, 256), G=32, each in float32 and bfloat16 (``gpu_check.sh`` runs it).

Layouts: gnorm, flax, haiku and the floor get NHWC input. Equinox's layer
takes one unbatched channels-first sample, so it is ``jax.vmap``-ed over the
batch and given NCHW input (transposed once, outside the timed region): it is
measured in the layout it wants. Torch is timed on both a contiguous NCHW and
a channels-last tensor and the faster counts; forward runs under
``torch.no_grad()``, forward+backward is ``torch.autograd.grad`` for ``x``,
``weight`` and ``bias``. On the CPU ``torch.set_num_threads`` is set to the
cores XLA uses and ``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` (see
``bench.py``). Parameters are float32 for every JAX implementation, also for
the bfloat16 input (so flax and haiku, which promote to the parameter dtype,
return float32 there; gnorm and equinox return bfloat16); torch's are in x's
dtype, as torch users keep them (its CUDA backward rejects float32 parameters
with bfloat16 input); the floor's ``g`` and ``b`` are in ``x``'s dtype so that
it writes ``x``'s dtype.

Modules, in the order a run uses them:

* ``cases``: the shapes (``Case``, the case sets), their data, the float64 reference;
* ``machine``: backend, host, torch's device, copy bandwidth;
* ``prepared``, ``impls_jax``, ``impls_torch``: each implementation set up
  for one case, as zero-argument blocking calls;
* ``timing``: calibrated samples, interleaved rounds;
* ``run``: the two sections, per case: prepare, compile, check, time;
* ``summary``, ``pallas_targets``: ratios, geometric means, target checks;
* ``report_md``, ``report_md_fused``, ``report_util``, ``report_png``: the outputs;
* ``cli``: the flags and the files; ``benchmarks/bench.py`` calls it.
* ``model``: the ResNet-block stack that ``benchmarks/drop_in.py`` trains with
  flax's GroupNorm, the linen drop-in and gnorm's fused layer (issue #14).
* ``device_*``: ``benchmarks/gpu_bench.py``'s device-time benchmark (issues 19 and
  20): ``device_cases`` (the GPU case set, the order of the work), ``device_loop``
  (chained calls in one program), ``device_timing``, ``device_impls`` (JAX),
  ``device_torch`` (CUDA graphs), ``device_accuracy``, ``device_profile``,
  ``device_run``, ``device_targets``, ``device_report``; and
  ``device_pytest_deadline``, the plugin that ends ``gpu_check.sh``'s test step in time.
"""
