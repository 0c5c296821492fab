"""
What every SLM script starts from: config files and --key=value flags (with --help), one-line
errors, and atomic file writes (a full disk is one line too). The rest of what the scripts share
lives by concern: device.py (device, precision, timing), data.py (tokenizer, stories, .bin files),
checkpoints.py and hf.py (model files and Hugging Face folders), runlog.py (log.jsonl and its plot).
"""
import ast
import json
import os
import re
import sys


def die(msg):
    """Stop with one clear line on stderr (exit code 1): the problem and the fix."""
    sys.exit(f"error: {msg}")


# -----------------------------------------------------------------------------
# config: module-level defaults <- python config files <- --key=value flags

def config_defaults(namespace):
    """The config keys of a script: its module-level plain values, nanoGPT style
    (UPPER_CASE constants are not options)."""
    return {k: v for k, v in namespace.items() if not k.startswith('_') and not k.isupper()
            and isinstance(v, (int, float, bool, str, type(None)))}


def _check_type(key, value, default, source, nullable):
    if value is None and default is not None and key not in nullable:
        die(f"{source}: {key} cannot be None: pass a {type(default).__name__} like the default {default!r}")
    if default is None or value is None or type(value) is type(default):
        return value
    if isinstance(default, float) and type(value) is int:
        return float(value)
    die(f"{source}: {key} must be {type(default).__name__} (like the default {default!r}), "
        f"got {type(value).__name__} {value!r}")


def config_meanings(script):
    """{key: the comment beside its default} in a script's config block: --help prints these,
    so the documentation of a flag is the one comment in the code. An indented comment line
    right below continues the comment above it."""
    meanings, key = {}, None
    with open(script) as f:
        for line in f:
            m = re.match(r"(\w+) = [^#]*#\s*(.*)", line)
            if m:
                key = m.group(1)
                meanings[key] = m.group(2).strip()
            elif key and re.match(r"\s+#", line):
                meanings[key] += ' ' + line.strip().lstrip('#').strip()
            else:
                key = None
    return meanings


def print_help(defaults, script):
    """Every key with its default and its meaning, in the order the script defines them."""
    meanings = config_meanings(script) if script else {}
    flags = {k: f"--{k}={v!r}" for k, v in defaults.items()}
    width = max(map(len, flags.values()))
    print(f"usage: python {os.path.basename(script or 'script.py')} [config.py ...] [--key=value ...]\n"
          f"Config files (Python) are applied first, then the flags. Keys, defaults and meanings:")
    for k, flag in flags.items():
        print(f"  {flag:<{width}}  {meanings.get(k, '')}".rstrip())


def parse_config(defaults, argv=None, nullable=(), script=None, given=None):
    """Apply config files (positional args) then --key=value flags to a copy of defaults.

    Unknown keys and wrong types stop with a message listing the valid keys; None is a value
    only for the keys in nullable (and those whose default is None). --help prints every key
    with its default and the comment beside it in script (the caller's __file__).
    A config file is plain Python whose top-level assignments set config keys.
    given: a set that receives the keys a config file or flag set (train.py's fine-tune asks).
    """
    given = set() if given is None else given
    argv = sys.argv[1:] if argv is None else argv
    config = dict(defaults)
    valid = ", ".join(sorted(defaults))
    for arg in argv:
        if arg in ('-h', '--help'):
            print_help(defaults, script)
            sys.exit(0)
        if not arg.startswith('--'):
            if not os.path.isfile(arg):
                die(f"config file {arg!r} not found (arguments are config files or --key=value flags)")
            file_ns = {}
            try:
                with open(arg) as f:
                    exec(compile(f.read(), arg, 'exec'), file_ns)
            except Exception as e:
                die(f"config file {arg} failed to run: {type(e).__name__}: {e}")
            for key, value in config_defaults(file_ns).items():
                if key not in defaults:
                    die(f"config file {arg} sets unknown key {key!r}; valid keys: {valid}")
                config[key] = _check_type(key, value, defaults[key], arg, nullable)
                given.add(key)
            continue
        key, eq, raw = arg[2:].partition('=')
        if key not in defaults:
            die(f"unknown option --{key}; valid keys: {valid}")
        if not eq:
            if not isinstance(defaults[key], bool):
                die(f"--{key} needs a value: --{key}=VALUE")
            raw = 'True'  # a bare --flag switches a boolean on
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare word is a string: --device=cuda
        if isinstance(defaults[key], str) and not isinstance(value, str):
            value = raw  # --out_dir=123 is still a path
        config[key] = _check_type(key, value, defaults[key], f"--{key}", nullable)
        given.add(key)
    for key, value in config.items():  # a path with a NUL byte fails deep inside open()
        if isinstance(value, str) and '\0' in value:
            die(f"{key} holds a NUL byte: pass plain text")
    check_rules(config, config_meanings(script) if script else {})
    return config


# a comment that ends in a rule: "in [1, inf)", a range ([ ] include the ends, ( ) leave them
# out), or "in {auto, nccl, gloo}", the choices
RULE = re.compile(r"\bin (?:([\[(])([^,]+), ([^,]+)([\])])|\{([^}]*)\})$")


def check_rules(config, meanings):
    """Stop with one line on a value its rule excludes. The rule is the end of the comment beside
    the default: written once, enforced here, printed by --help. None (where allowed) passes."""
    for key, meaning in meanings.items():
        m, value = RULE.search(meaning), config.get(key)
        if not m or value is None:
            continue
        if m.group(5) is not None:
            ok = str(value) in [choice.strip() for choice in m.group(5).split(',')]
        else:
            low, high = (rule_bound(b) for b in m.group(2, 3))
            ok = ((low <= value if m.group(1) == '[' else low < value)  # False for nan
                  and (value <= high if m.group(4) == ']' else value < high))
        if not ok:
            die(f"--{key}={value!r} must be {m.group(0)}: {meaning[:m.start()].rstrip(' ,;:')}")


def rule_bound(text):
    """A range's end: a number, inf, or a power such as 2**63."""
    base, _, power = text.strip().partition('**')
    number = float(base) if 'inf' in base else ast.literal_eval(base)
    return number ** ast.literal_eval(power) if power else number


# -----------------------------------------------------------------------------
# files: written to a temp name in the same folder, then renamed into place

def disk_full(exc):
    """(cause, fix) when exc is a write that failed for want of room (a full disk or quota, a
    file past the size limit: ENOSPC, EDQUOT, EFBIG), else None. Libraries wrap the OSError:
    torch.save raises a RuntimeError during it ([enforce fail at inline_container.cc]), Rust
    ones (safetensors) put its "os error N" in their message; both are looked through."""
    import errno
    causes = {errno.ENOSPC: ('no space left on device', 'free some space or write to another disk'),
              errno.EFBIG: ("file too large (past the file-size limit, `ulimit -f`, or the filesystem's largest file)",
                            'raise the limit or write to another disk')}
    if hasattr(errno, 'EDQUOT'):  # a full quota (not on every platform)
        causes[errno.EDQUOT] = ('disk quota exceeded', 'free some space or write to another disk')
    seen = set()
    while exc is not None and id(exc) not in seen:  # exc, then what it was raised from or during
        seen.add(id(exc))
        code = exc.errno if isinstance(exc, OSError) else None
        if code is None:
            m = re.search(r'os error (\d+)', str(exc))
            code = int(m.group(1)) if m else None
        if code in causes:
            return causes[code]
        exc = exc.__cause__ or exc.__context__
    return None


def die_if_disk_full(exc, path):
    """Stop with one line naming path when exc is a write that failed for want of room, else
    return (the caller re-raises). Every writer ends here: a full disk reads the same in every
    script."""
    full = disk_full(exc)
    if full:
        die(f"cannot write {path}: {full[0]}: {full[1]}")


def atomic_write(path, write_fn, mode='wb'):
    """Call write_fn(file) on a temp file beside path, then rename it to path.

    A crash or Ctrl-C mid-write leaves the old file (or none), never half a file; a full disk
    stops with one line naming path (die_if_disk_full).
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        die_if_disk_full(e, path)
        raise


def check_writable(path, flag, folder=True):
    """Stop now, with one line, if path (a folder, or a file when folder=False) could not be
    written later: it is the wrong kind, sits under a file, or its place is not writable.
    Creates nothing, so a run that stops here leaves nothing behind."""
    path = os.path.abspath(path)
    kind = 'folder' if folder else 'file'
    if os.path.exists(path) and os.path.isdir(path) != folder:
        die(f"{flag}={path} is a {'file' if folder else 'folder'}, not a {kind}: pass a {kind} path")
    parent = path if folder else os.path.dirname(path)
    while not os.path.exists(parent):  # the nearest part of the path that exists
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        die(f"{flag}={path} cannot be made: {parent} is a file, not a folder; pass another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        die(f"{flag}={path} cannot be written: {parent} is not writable here; pass a writable {flag}")


def save_json(obj, path):
    atomic_write(path, lambda f: json.dump(obj, f, indent=2), mode='w')


def torch_save(obj, path):
    import torch
    atomic_write(path, lambda f: torch.save(obj, f))
