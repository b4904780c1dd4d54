"""XLA flags of the test processes (tests/conftest.py sets them before jax is imported) and of the processes the
tests start (training runs, notebook kernels, multi-process workers); a free port for the latter's coordinator."""
import socket

# XLA's CPU backend compiles with LLVM at -O0. The suite's programs are tiny, so compiling them is most of its
# time: -O0 compiles ~40% faster at a slower run time (tests/test_train_step.py: 148 s -> 82 s on 2 cores). It
# changes only how XLA's optimized HLO is turned into machine code.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int = 1, fast_compile: bool = True) -> str:
  """XLA_FLAGS for a test process or subprocess that sees `devices` CPU devices (fast_compile=False: XLA's default
  optimization, for a process that runs a few programs many times)."""
  flags = f"--xla_force_host_platform_device_count={devices}"
  return f"{FAST_COMPILE} {flags}" if fast_compile else flags


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now (for a jax.distributed coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]
