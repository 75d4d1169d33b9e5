"""Type stub of the private native extension (built from native/ by setup.py)."""

from typing import Any

def cpu_features() -> dict[str, bool]:
    """Which kernel families this CPU can run: avx2, avx512vnni, amx_int8 (CPU and OS, with AVX512-VNNI)."""

def prefetch_distance() -> int:
    """Bytes the k-quant kernels prefetch ahead of their weight reads (process-wide)."""

def set_prefetch_distance(num_bytes: int) -> None:
    """Sets it (0..65536; 0: no L1 prefetch stream). ValueError outside that range."""

def prefetch_next_row() -> bool:
    """Whether the k-quant kernels also stream the next row into L2 one row ahead (process-wide; default off)."""

def set_prefetch_next_row(on: bool) -> None:
    """Turns that L2 stream on or off."""

def read_bandwidth(num_bytes: int, num_threads: int, repeats: int = 3) -> float:
    """Best-of-repeats multi-threaded read bandwidth over a num_bytes buffer, in GB/s."""

def lock_memory(buffer: Any) -> None:
    """mlock() the buffer's pages; ValueError naming RLIMIT_MEMLOCK when the OS refuses."""

class MoeRunner:
    def __init__(
        self,
        gate: Any,
        up: Any,
        down: Any,
        gate_type: int,
        up_type: int,
        down_type: int,
        n_expert: int,
        hidden: int,
        intermediate: int,
        num_threads: int,
        isa: str = "auto",
        tile_isa: str = "auto",
        tile_min_tokens: int = 8,
    ) -> None:
        """tile_isa: "auto" | "amx" | "amx-emulated" | "off"; experts with >= tile_min_tokens tokens in a call
        run on int8 tiles (k-quant weights only). ValueError for an unknown or unavailable tile_isa."""
    def submit(
        self,
        x: int,
        x_bf16: bool,
        topk_ids: int,
        ids_int64: bool,
        topk_weights: int,
        out: int,
        num_tokens: int,
        top_k: int,
    ) -> None:
        """Start one call on data pointers (GIL released); returns before the result is ready."""
    def wait(self) -> None:
        """Block (GIL released) until the submitted call has finished."""
    @property
    def pending(self) -> bool: ...
    @property
    def isa(self) -> str: ...
    @property
    def tile_isa(self) -> str:
        """The tile path in use: "amx", "amx-emulated" or "off"."""
    @property
    def tile_min_tokens(self) -> int: ...
    @property
    def phase_ns(self) -> list[int]:
        """The last call's phase times in ns: quantize x, pack x, gate+up, quantize h, down."""
    @property
    def call_buffer_bytes(self) -> int:
        """Per-call buffers kept between calls: a decode-sized call's stay, larger ones are freed by wait()."""
    @property
    def num_threads(self) -> int: ...

# ---- host calls (native/include/ksdk/host_call.h): routed experts as host nodes of captured decode steps ----

def moe_host_call_address() -> int:
    """Address of ``ksdk_moe_host_call(void* user_data)``, the CUhostFn a captured step enqueues with
    cuLaunchHostFunc; ``user_data`` is a :attr:`HostCall.address`. Also exported as a C symbol."""

class HostCallLog:
    """What the host calls of one model's step graphs report: the first error, calls and time in experts."""

    def __init__(self) -> None: ...
    def take_error(self) -> str:
        """The first error recorded since the last take ("" when none); clears it."""
    def reset_counters(self) -> None: ...
    @property
    def expert_ns(self) -> int:
        """Wall time inside the host calls (submit -> wait), summed, in ns."""
    @property
    def calls(self) -> int: ...
    def new_step(self) -> None:
        """Mark a step's launch: the lead runs from here to its first host call, and no gap crosses it."""
    @property
    def gap_ns(self) -> int:
        """Summed time from one host call's end to the next one's start within a step (one MoE layer's GPU
        work, copies and round trip each), in ns."""
    @property
    def gaps(self) -> int: ...
    @property
    def lead_ns(self) -> int:
        """Summed time from new_step() to each step's first host call, in ns."""
    @property
    def leads(self) -> int: ...
    skip_experts: bool
    """When set, host calls zero their output instead of running the experts (to time everything else)."""

class HostCall:
    """One MoE layer's call at one batch size on fixed buffers (pinned host memory in a graph); keeps the
    runner and the log alive as long as itself."""

    def __init__(
        self,
        runner: MoeRunner,
        log: HostCallLog,
        x: int,
        x_bf16: bool,
        topk_ids: int,
        ids_int64: bool,
        topk_weights: int,
        out: int,
        num_tokens: int,
        top_k: int,
        hidden: int,
    ) -> None: ...
    @property
    def address(self) -> int:
        """The user_data pointer to pass with :func:`moe_host_call_address`'s function."""

class HostCallServer:
    """Serves host calls through two uint32 words of host memory (pinned for a GPU) on its own thread: a
    step writes a call's id (from :meth:`add`) into ``doorbell`` and waits until ``done`` equals it, then
    writes 0 to ``done``. The thread clears ``doorbell``, runs the call and stores the id in ``done``
    (an unknown id is answered without running anything)."""

    def __init__(self, doorbell: int, done: int) -> None: ...
    def add(self, host_call: HostCall) -> int:
        """Register a call (kept alive as long as this server); returns its id, from 1 on."""
    def arm(self, num_calls: int) -> None:
        """Serve the next ``num_calls`` doorbells, then sleep again (call it after launching the step)."""
    def finish(self, timeout_ms: int) -> bool:
        """Wait until the armed calls are served (True), or stop waiting for them after ``timeout_ms``
        (False)."""
    @property
    def served(self) -> int:
        """Calls served since construction."""
