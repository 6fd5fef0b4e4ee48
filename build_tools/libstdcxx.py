"""Which libstdc++ the extension links against: the one torch already runs on.

A compiler whose own libstdc++ is only a static archive (seen on the GPU image's /opt/gcc g++ 13.3)
copies libstdc++'s stream and locale code into _C.so. That private copy is never initialised in a
process whose libstdc++ is torch's shared one, so the first error message that formats a number
(every TORCH_CHECK naming "tensor #i") crashed the interpreter with SIGSEGV inside
std::basic_ostream::_M_insert<unsigned long>. Naming the shared library the process has loaded as a
link input resolves every libstdc++ symbol to it, whatever archive the compiler would add after it;
where the compiler links the shared one anyway this is the same file and changes nothing.

Pure functions of their inputs, tested in tests/test_build_decisions.py.
"""

from __future__ import annotations

import os


def loaded_libstdcxx(maps_text: str) -> str | None:
    """The path of the libstdc++.so mapped into a process, from its /proc/<pid>/maps text."""
    for line in maps_text.splitlines():
        fields = line.split()
        if len(fields) >= 6 and os.path.basename(fields[5]).startswith("libstdc++.so"):
            return fields[5]
    return None


def libstdcxx_link_args() -> list[str]:
    """Extra link inputs: this process's libstdc++ (torch imported first), or none off Linux."""
    try:
        with open("/proc/self/maps") as f:
            path = loaded_libstdcxx(f.read())
    except OSError:
        return []
    return [path] if path and os.path.exists(path) else []
