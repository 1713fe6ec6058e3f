"""Benchmarks: xlsce side by side with each framework's own loss (issue 3).

Run ``python -m benchmarks`` (full, about 15 minutes on a 2-core CPU) or
``python -m benchmarks --quick`` (tiny shapes, under a minute); ``--help`` lists
the options that select backends, shapes, dtypes, variants and implementations.

What is measured, per case (shape (N, K), dtype, variant) and implementation:

* time of the forward (the loss alone, logits not requiring grad) and of the
  forward+backward (loss and d loss / d logits): the median of ``--runs`` (>= 5)
  runs after a warm-up, in one process, on the same inputs.  Each run times a
  loop of calls long enough (``--min-time``) that timer resolution does not
  matter, and reports the time per call; JAX results are blocked on each call.
  The implementations of a case are timed in turns (run 1 of each, then run 2 of
  each, ...), so that a slow spell of the shared machine falls on all of them,
  not on whichever was being timed: the ratios are what the targets are about.
* peak memory of the forward+backward, net of the inputs (so it includes the
  gradient that must be returned), also as a multiple of the logits' size:

  - PyTorch and NumPy: in a fresh process per case (``python -m benchmarks.memory``):
    the inputs are built and one warm-up call is made (so compilation and lazy
    initialisation are not counted), then the kernel's peak-RSS counter is reset
    (``/proc/self/clear_refs`` = 5) and one more call is made while its outputs are
    held; peak = VmHWM - VmRSS before the call.  Where clear_refs cannot be written,
    the ``resource.getrusage`` ru_maxrss delta is used instead (it then also counts
    the warm-up call).  For NumPy the tracemalloc peak of the call is recorded too
    (NumPy reports its buffers to tracemalloc), which is exact and page-independent.
    ``python -m benchmarks`` starts that process with glibc's ``MALLOC_MMAP_THRESHOLD_``
    and ``MALLOC_TRIM_THRESHOLD_`` fixed at 128 KiB (``memory.MALLOC_ENV``), so that every
    large buffer is mapped when allocated and unmapped when freed: RSS then follows the
    live buffers.  With glibc's default (a threshold that adapts to the sizes freed),
    whether freed memory was kept in the heap, and reused by the measured call, changed
    from process to process: ``python -m benchmarks.memory`` on the same bfloat16 case
    read 1.92x, 0.23x, 1.02x and 1.92x the logits in four runs, and 1.04x every time
    with the two variables set to 131072 in its environment.
  - JAX: ``jax.jit(f).lower(...).compile().memory_analysis()``: temp + output -
    alias bytes (what XLA allocates besides the arguments).

  RSS has page granularity and allocator noise of a few MiB, so memory is only
  measured for shapes of at least ``--memory-min-size`` elements.

* the loss and the L1 norm of the gradient of every implementation, checked
  against xlsce's on the same backend: a benchmark of a wrong computation is void.

The results go to ``--out`` (default ``docs/benchmarks/``): ``results.json``,
``results.md`` (tables of times, ratios xlsce / best anchor on the same backend,
memory, and the issue's targets) and ``ratios.png``.  ``results.json`` is also
rewritten after each case, so a run cut short keeps what it measured.

On the GPU, ``python -m benchmarks --device cuda --budget 540`` (output in
``docs/benchmarks/cuda/`` unless ``--out`` says otherwise):

* torch on CUDA and JAX on its GPU (``JAX_PLATFORMS=cuda``); a backend without one
  is skipped, and with none the run exits with status 2 before measuring;
* the cases: (4096, 32768) and (65536, 1000) in float32 and bfloat16, (256, 10) in
  float32, plain and masked, and the fused linear loss ``--linear 8192x4096x128256``
  in bfloat16 (``xlsce.linear_cross_entropy`` against the materialised
  ``cross_entropy(h @ W.T)`` of xlsce and of PyTorch, gradients for h and W);
* the implementations ``--impl xlsce --impl F.cross_entropy --impl optax --impl
  floor``: eager and ``torch.compile``, JAX's jit against both optax formulations,
  and the bandwidth floor (``-z``: reading the logits once and writing a gradient
  once; its forward, ``sum(z)``, reads them once), to which xlsce's time is compared;
* 10 runs of at least 0.02 s each, every call followed by ``torch.cuda.synchronize()``
  (``jax.block_until_ready``) inside the timed region;
* torch's memory: ``torch.cuda.max_memory_allocated()`` during one forward+backward
  (outputs held) minus ``torch.cuda.memory_allocated()`` before it, compiled
  implementations included; JAX's: XLA's memory analysis, as on the CPU;
* a host-synchronisation check: each torch implementation's forward+backward once
  under ``torch.cuda.set_sync_debug_mode("error")`` (``host_sync`` in each record:
  None, or the error that a synchronising operation raised).

``--budget SECONDS`` (on any device) stops the run that many seconds after it started: the
worker process measuring is stopped (its case under way is lost), and what was
measured is written, with the measurements not made listed (``not_measured``,
``stopped`` in ``results.json``, "Partial results" in ``results.md``).  With a budget
the stages run in order of priority, each backend's in a process of its own: the
eager implementations, then the linear loss, then ``torch.compile`` (10 to 30 s to
compile per case), so the budget cuts the compiled variants first.  SIGTERM (as from
``timeout``) also stops the run and writes what was measured (exit status 124).
"""
