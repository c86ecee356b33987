"""Every change twinfer makes to CrypTen 0.4.1 (and to torch as CrypTen sees it), in one place.

Nothing here runs at import time: the crypten backend calls `load_crypten()` (fixes 1 to 4)
when a session starts, and tests call it before they touch CrypTen; `bind_session` (fixes 5
and 6) then binds the session's collaborators to the calling thread. Stock CrypTen over
torch.distributed (the gloo baseline) needs only `load_crypten()`. Each fix has a test in tests/test_crypten_compat.py
or tests/test_sessions_per_thread.py that fails without it.

1. torch >= 2.9 moved the ONNX symbolic registry that crypten's converter imports: alias it.
2. crypten's converter needs the TorchScript exporter; torch >= 2.9 defaults to dynamo:
   crypten's view of torch.onnx.export defaults to dynamo=False (the user's torch is untouched).
3. crypten.nn.Module.load_state_dict copies parameters but silently skips buffers: copy them.
4. CrypTen keeps its generators and its configuration in module globals; a process running
   several sessions (one per thread) gets one set per thread.
5. crypten.init() builds `crypten.communicator.DistributedCommunicator`; it is rebound to a
   class whose instance is the calling thread's own communicator (over twinfer's transport).
6. CrypTen's TTP provider reaches its client through `ttp_provider.TTPClient`; it is rebound
   to ttp.TtpClient, so that each thread's tuples come from that thread's dealer (its
   correlation source, adapted to the two calls CrypTen makes).
"""

from __future__ import annotations

import functools
import importlib
import sys
import threading
from types import ModuleType
from typing import Any

import torch

from .ttp import TtpClient

PROVIDER_NAME = "TWINFER_DEALER"
_lock = threading.Lock()
_loaded = False


def _alias_onnx_registration() -> None:
    old = "torch.onnx._internal.registration"
    if old in sys.modules:
        return
    try:
        importlib.import_module(old)
    except ModuleNotFoundError:
        sys.modules[old] = importlib.import_module("torch.onnx._internal.torchscript_exporter.registration")


def _torchscript_export(original):
    @functools.wraps(original)
    def export(*args, **kwargs):
        kwargs.setdefault("dynamo", False)
        return original(*args, **kwargs)

    export.__twinfer_patched__ = True
    return export


class _TorchWithScriptExport:
    """torch as crypten's converter sees it: torch.onnx.export defaults to dynamo=False."""

    def __init__(self, real: ModuleType) -> None:
        self._real = real
        self.onnx = _OnnxWithScriptExport(real.onnx)

    def __getattr__(self, name):
        return getattr(self._real, name)


class _OnnxWithScriptExport:
    def __init__(self, real: ModuleType) -> None:
        self._real = real
        self.export = _torchscript_export(real.export)

    def __getattr__(self, name):
        return getattr(self._real, name)


def _load_buffers_too(original):
    @functools.wraps(original)
    def load_from_state_dict(self, state_dict, prefix, strict):
        original(self, state_dict, prefix, strict)
        for name, buffer in list(self._buffers.items()):
            key = prefix + name
            if key not in state_dict:
                if strict and buffer is not None:
                    raise ValueError(f"Key {key} not found in state dict.")
                continue
            value = state_dict[key]
            if buffer is not None and tuple(value.size()) != tuple(buffer.size()):
                raise ValueError(f"Size mismatch for buffer {key}: {tuple(value.size())} vs {tuple(buffer.size())}")
            self._buffers[name] = value.clone() if torch.is_tensor(value) else value

    load_from_state_dict.__twinfer_patched__ = True
    return load_from_state_dict


class _ThreadLocalGenerators(dict):
    """crypten.generators with one set of generators per thread.

    CrypTen keeps the generators of its pseudo-random zero sharings ("prev", "next",
    "local", "global") in one module-level dict; two sessions in one process would draw from
    each other's generators and desynchronise from their peers. This mapping has CrypTen's
    four keys, and each lookup returns the calling thread's own dict of generators.
    """

    KEYS = ("prev", "next", "local", "global")

    def __init__(self) -> None:
        super().__init__({key: None for key in self.KEYS})
        self._local = threading.local()

    def __getitem__(self, key: str) -> dict:
        if key not in self.KEYS:
            raise KeyError(key)
        per_thread = getattr(self._local, "generators", None)
        if per_thread is None:
            per_thread = self._local.generators = {k: {} for k in self.KEYS}
        return per_thread[key]


def _thread_local_config_class(base_class: type) -> type:
    from omegaconf import OmegaConf

    class ThreadLocalConfig(base_class):
        """crypten.cfg with one configuration per thread.

        CrypTen changes its configuration in the middle of protocols (cfg.temp_override swaps
        the whole config, e.g. to "pairwise" inside max pooling); two sessions in one process
        would see each other's overrides, and the two parties of a session would then run
        different algorithms. The main thread keeps the process-wide configuration; every other
        thread starts from a copy of it taken when the thread first reads it.
        """

        @property
        def config(self):
            if threading.current_thread() is threading.main_thread():
                return object.__getattribute__(self, "_base")
            local = object.__getattribute__(self, "_local")
            mine = getattr(local, "config", None)
            if mine is None:
                mine = local.config = OmegaConf.create(OmegaConf.to_container(object.__getattribute__(self, "_base")))
            return mine

        @config.setter
        def config(self, value):
            if threading.current_thread() is threading.main_thread():
                object.__setattr__(self, "_base", value)
            else:
                object.__getattribute__(self, "_local").config = value

    return ThreadLocalConfig


def _use_thread_local_state(crypten: ModuleType) -> None:
    if not isinstance(crypten.generators, _ThreadLocalGenerators):
        crypten.generators = _ThreadLocalGenerators()
    cfg = crypten.config.cfg
    if not getattr(type(cfg), "_twinfer_thread_local", False):
        base = cfg.__dict__.pop("config")
        object.__setattr__(cfg, "_base", base)
        object.__setattr__(cfg, "_local", threading.local())
        cls = _thread_local_config_class(type(cfg))
        cls._twinfer_thread_local = True
        cfg.__class__ = cls


class _ThreadCommunicator:
    """Stands in for crypten.communicator.DistributedCommunicator: this thread's communicator."""

    _local = threading.local()

    @classmethod
    def is_initialized(cls) -> bool:
        return getattr(cls._local, "instance", None) is not None

    @classmethod
    def initialize(cls, rank: int = 0, world_size: int = 1, init_ttp: bool = False) -> None:
        pending = getattr(cls._local, "pending", None)
        if pending is None:
            raise RuntimeError("bind_session() must run before crypten.init()")
        if init_ttp:
            raise RuntimeError("CrypTen's TTP over torch.distributed is not used; twinfer's dealer provides tuples")
        cls._local.instance = pending

    @classmethod
    def get(cls):
        return getattr(cls._local, "instance", None)

    @classmethod
    def shutdown(cls) -> None:
        cls._local.instance = None
        cls._local.pending = None


def load_crypten() -> ModuleType:
    """Import crypten with every fix applied (idempotent, thread-safe); returns the module."""
    global _loaded
    with _lock:
        _alias_onnx_registration()
        import crypten

        if not _loaded:
            import crypten.nn.module as crypten_module
            import crypten.nn.onnx_converter as converter

            if not getattr(converter.torch.onnx.export, "__twinfer_patched__", False):
                converter.torch = _TorchWithScriptExport(torch)
            module_cls = crypten_module.Module
            if not getattr(module_cls._load_from_state_dict_crypten, "__twinfer_patched__", False):
                module_cls._load_from_state_dict_crypten = _load_buffers_too(module_cls._load_from_state_dict_crypten)
            _use_thread_local_state(crypten)
            _loaded = True
    return crypten


def _route_to_threads() -> None:
    """Fixes 5 and 6: CrypTen's communicator and TTP client become this thread's (idempotent)."""
    import crypten.communicator as comm_module
    import crypten.mpc as crypten_mpc
    from crypten.mpc.provider import ttp_provider

    comm_module.DistributedCommunicator = _ThreadCommunicator
    ttp_provider.TTPClient = TtpClient
    providers = getattr(crypten_mpc, "__SUPPORTED_PROVIDERS")
    providers.setdefault(PROVIDER_NAME, ttp_provider.TrustedThirdParty())


def require_loaded() -> None:
    """Modules that subclass CrypTen's classes are imported only after load_crypten()."""
    if not _loaded:
        raise ImportError("call twinfer.protocols.backends.crypten.patches.load_crypten() before importing this module")


def bind_session(communicator: Any, dealer: Any | None, precision_bits: int | None = None) -> None:
    """Make crypten.init() in this thread use `communicator`, and draw tuples through `dealer` (a CorrelationSource).

    `dealer` None is CrypTen's trusted first party (the server makes the tuples itself and
    could learn the client's input: development only). `precision_bits`: the session's
    fixed-point fractional bits (this thread's cfg.encoder.precision_bits until unbind_session).
    """
    crypten = load_crypten()
    with _lock:
        _route_to_threads()
    _ThreadCommunicator._local.pending = communicator
    _ThreadCommunicator._local.precision = crypten.cfg.encoder.precision_bits  # restored by unbind_session
    if precision_bits is not None:
        crypten.cfg.encoder.precision_bits = precision_bits
    if dealer is None:
        crypten.cfg.mpc.provider = "TFP"
    else:
        TtpClient.bind(dealer)
        crypten.cfg.mpc.provider = PROVIDER_NAME


def unbind_session() -> None:
    crypten = load_crypten()
    crypten.uninit()
    TtpClient.uninit()
    previous = getattr(_ThreadCommunicator._local, "precision", None)
    if previous is not None:
        crypten.cfg.encoder.precision_bits = previous
        _ThreadCommunicator._local.precision = None
