#!/bin/sh
# Run a command with gcc's AddressSanitizer and UBSan runtimes preloaded: CPython itself is not
# instrumented, and the runtime must be loaded before the instrumented codec. Used by `tox -e asan`.
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export LD_PRELOAD
exec "$@"
