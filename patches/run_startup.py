"""`cogsurgeon run`'s startup code: copied as `sitecustomize.py` into a folder that `cogsurgeon run` puts first on the
launched program's PYTHONPATH, so that it runs at the start of that program and of every Python process it starts
(torchrun and accelerate workers, subprocesses) that inherits the environment.

It costs nothing until the program imports diffusers' CogVideoX transformer module: an import hook then wraps
`CogVideoXTransformer3DModel.__init__` (and the `__init__` of every subclass defined later, so that a subclass is
patched when its own `__init__` is done) so that every model built (by `from_pretrained`, `from_config` or directly)
gets the patches in COGSURGEON_RUN_PATCHES (a JSON list of `NAME` or `NAME:key=value,...` specs), and says so on stderr.
With COGSURGEON_RUN_RECORD (`{"path", "groups"}`) every model built also has its attention recorded
(`cogsurgeon.inspector.record_attention`), saved when the program exits: the first model to `path`, others beside it.
The sitecustomize that this one shadows (the program's own, if any) still runs. Each model built leaves a `built-PID-N`
file in this folder, so that `run` can say when the program built none. Standard library only: cogsurgeon itself is
imported when a model is built, from the installed `cogsurgeon` or else from COGSURGEON_RUN_ROOT.
"""

import atexit
import functools
import importlib.abc
import importlib.machinery
import importlib.util
import itertools
import json
import os
import sys
import threading

PATCHES_VARIABLE = "COGSURGEON_RUN_PATCHES"
RECORD_VARIABLE = "COGSURGEON_RUN_RECORD"
RECORDED_MARKER = "recorded-"  # `cogsurgeon run` lists the recordings written from these files
ULYSSES_VARIABLE = "COGSURGEON_RUN_ULYSSES"
ROOT_VARIABLE = "COGSURGEON_RUN_ROOT"
TARGET_MODULE = "diffusers.models.transformers.cogvideox_transformer_3d"
BUILT_MARKER = "built-"  # `cogsurgeon run` counts these files in this folder to say whether any model was built
_HERE = os.path.dirname(os.path.abspath(__file__))
_loading = threading.local()
_built = itertools.count()
_recorded = itertools.count()


def _say(message):
    print(f"cogsurgeon run: {message}", file=sys.stderr, flush=True)


def _cogsurgeon_patches():
    """cogsurgeon's `patches` package: the installed `cogsurgeon` when this interpreter has one, else the one that
    launched this program, from COGSURGEON_RUN_ROOT (the folder holding its `inspector`, `patches` and `tools`).
    Everything lives under the `cogsurgeon` name, so the program's own `patches` or `tools` cannot hide it."""
    try:
        from cogsurgeon import patches

        return patches
    except ImportError:
        root = os.environ.get(ROOT_VARIABLE)
        if not root:
            raise
    import types

    namespace = types.ModuleType("cogsurgeon")
    namespace.__path__ = [root]
    sys.modules["cogsurgeon"] = namespace
    from cogsurgeon import patches

    return patches


def _describe(model, source):
    config, rank = model.config, os.environ.get("RANK")
    where = f" from {source}" if source else ""
    process = f"pid {os.getpid()}" + (f", rank {rank}" if rank is not None else "")
    layers, heads = config.num_layers, config.num_attention_heads
    size = f"{layers} layer{'s' * (layers != 1)}, {heads} head{'s' * (heads != 1)}"
    return f"{type(model).__name__}{where} ({size}) [{process}]"


def _patch_specs():
    return json.loads(os.environ.get(PATCHES_VARIABLE) or "[]")


def _record_built():
    try:
        open(os.path.join(_HERE, f"{BUILT_MARKER}{os.getpid()}-{next(_built)}"), "x").close()
    except OSError:  # the launcher is gone or its folder unwritable: only its closing note is lost
        pass


def _record_request():
    return json.loads(os.environ.get(RECORD_VARIABLE) or "null")


def _recording_path(path):
    """The first model (of any process of the run) records to `path`, every other one to `path` with `.PID-N`."""
    try:
        os.close(os.open(os.path.join(_HERE, "record-claimed"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return path
    except OSError:
        stem, suffix = os.path.splitext(path)
        return f"{stem}.{os.getpid()}-{next(_recorded)}{suffix}"


def _start_recording(model, request):
    _cogsurgeon_patches()  # makes `cogsurgeon` importable
    from cogsurgeon.inspector.attention_xray import record_attention

    path = _recording_path(request["path"])
    recording = record_attention(model, request["groups"]).__enter__()  # on for the life of the process
    atexit.register(_save_recording, recording, path)
    _say(f"recording attention ({request['groups']}) of {_describe(model, None)} -> {path}")


def _save_recording(recording, path):
    if not recording.steps:
        _say(f"no forward of the model ran: no attention recorded for {path}")
        return
    try:
        recording.save(path)
    except Exception as exc:
        _say(f"could not write the attention recording {path}: {exc}")
        return
    try:
        with open(os.path.join(_HERE, f"{RECORDED_MARKER}{os.getpid()}-{next(_recorded)}"), "x") as marker:
            marker.write(path)
    except OSError:  # the launcher is gone: it cannot list the file, which is written all the same
        _say(f"attention recorded in {path}")


def _ulysses_degree():
    return int(os.environ.get(ULYSSES_VARIABLE) or 0)


def _enable_context_parallel(model, degree):
    """The process group (NCCL on this rank's GPU, gloo without one) and `cogsurgeon.parallel.enable`. With a GPU,
    `torch.cuda.set_device(LOCAL_RANK)`, so that the program's `.to("cuda")` puts each rank on its own GPU."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        # The group is ours, and so is ending it, together: left to the interpreter's teardown, a rank aborted at
        # exit ("terminate called without an active exception", SIGABRT) in 2 of 16 runs of tests/test_parallel.py's
        # `run --ulysses 2`; destroyed at exit without a barrier, 1 in 30; with the barrier first, 0 in 70 (two loops
        # at once on 2 cores). A program that destroys the group itself is left to do so. A rank that ends on an
        # uncaught exception skips the barrier: its peers may be stuck in a collective waiting for it, and torchrun
        # ends them once this one is gone.
        _note_uncaught_exceptions()
        atexit.register(_destroy_process_group_if_left)
    from cogsurgeon import parallel

    parallel.enable(model, ulysses=degree)


_ended_by_exception = []  # set by the excepthook below: the program is ending on an uncaught exception


def _note_uncaught_exceptions():
    previous = sys.excepthook

    def noting(*exc_info):
        _ended_by_exception.append(True)
        previous(*exc_info)

    sys.excepthook = noting


def _destroy_process_group_if_left():
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        return
    try:
        if not _ended_by_exception:  # no rank tears its connections down while another may still be reading them
            if dist.get_backend() == "gloo":  # bounded: a peer that ended some other way does not hang this one
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
            else:
                dist.barrier()
    except Exception:  # a peer gone: nothing to wait for
        pass
    finally:
        dist.destroy_process_group()


def _patch_model(model):
    specs, degree = _patch_specs(), _ulysses_degree()
    request = _record_request()
    if not specs and not request and not degree:
        return
    _record_built()
    if request:
        _start_recording(model, request)
    if not specs and not degree:
        return
    try:
        patches = _cogsurgeon_patches()
        for spec in specs:
            name, options = patches.parse_patch_spec(spec)
            patches.apply(model, name, **options)
        if degree:
            _enable_context_parallel(model, degree)
            specs = [*specs, f"ulysses {degree}"]
    except Exception as exc:
        _say(f"could not patch {type(model).__name__} with {', '.join(specs) or f'ulysses {degree}'}: {exc}")
        raise
    stack = getattr(_loading, "stack", None)
    if stack:  # inside from_pretrained: report once the source is known
        stack[-1].append(model)
    else:
        _say(f"{', '.join(specs)} -> {_describe(model, None)}")


def _wrap_init(klass):
    """Make `klass.__init__` (its own, if it has one) patch the model when the outermost `__init__` of the model
    returns: a subclass's `__init__` runs to its end (setting its own processors, say) before the patch goes on."""
    original = klass.__dict__.get("__init__")
    if original is None or getattr(original, "_cogsurgeon_run", False):
        return

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        depths = _loading.__dict__.setdefault("init_depths", {})
        depths[id(self)] = depths.get(id(self), 0) + 1
        try:
            original(self, *args, **kwargs)
        finally:
            depths[id(self)] -= 1
            outermost = not depths[id(self)]
            if outermost:
                del depths[id(self)]
        if outermost:
            _patch_model(self)

    __init__._cogsurgeon_run = True
    klass.__init__ = __init__


def _wrap_transformer_class(cls):
    inherited_from_pretrained = cls.from_pretrained.__func__
    own_init_subclass = cls.__dict__.get("__init_subclass__")

    def __init_subclass__(subclass, **kwargs):
        if own_init_subclass is not None:
            own_init_subclass.__func__(subclass, **kwargs)
        else:
            super(cls, subclass).__init_subclass__(**kwargs)
        _wrap_init(subclass)

    @functools.wraps(inherited_from_pretrained)
    def from_pretrained(klass, pretrained_model_name_or_path, *args, **kwargs):
        stack = _loading.__dict__.setdefault("stack", [])
        stack.append([])
        try:
            model = inherited_from_pretrained(klass, pretrained_model_name_or_path, *args, **kwargs)
        finally:
            built = stack.pop()
        names = ", ".join([*_patch_specs(), *([f"ulysses {_ulysses_degree()}"] if _ulysses_degree() else [])])
        for patched_model in built:
            _say(f"{names} -> {_describe(patched_model, pretrained_model_name_or_path)}")
        return model

    _wrap_init(cls)
    cls.__init_subclass__ = classmethod(__init_subclass__)
    cls.from_pretrained = classmethod(from_pretrained)


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _wrap_transformer_class(module.CogVideoXTransformer3DModel)


class _CogVideoXFinder(importlib.abc.MetaPathFinder):
    """Finds diffusers' CogVideoX transformer module as usual and loads it through `_PatchingLoader`."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PatchingLoader(spec.loader)
        return spec


def _run_shadowed_sitecustomize():
    """Run the sitecustomize that ours hides (later on sys.path), as Python would have."""
    rest = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


_wanted = os.environ.get(PATCHES_VARIABLE) or os.environ.get(RECORD_VARIABLE) or os.environ.get(ULYSSES_VARIABLE)
if _wanted and not any(isinstance(f, _CogVideoXFinder) for f in sys.meta_path):
    if TARGET_MODULE in sys.modules:
        _wrap_transformer_class(sys.modules[TARGET_MODULE].CogVideoXTransformer3DModel)
    else:
        sys.meta_path.insert(0, _CogVideoXFinder())
_run_shadowed_sitecustomize()


__all__: list[str] = []
