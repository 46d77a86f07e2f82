# Sourced by scripts/test.sh and scripts/demo.sh: `ensure_venv EXTRA` makes .venv ready.
#
# Creates .venv with `python3 -m venv` when it is missing, then installs CleanAI in editable
# mode with the given extra, pinned by constraints-ci.txt. A stamp in .venv remembers what was
# installed, so a second run with unchanged pyproject.toml/constraints installs nothing; when
# they change, pip only adds what is missing (torch is never reinstalled once present).

ensure_venv() {
    local extra="$1"
    local python="${PYTHON:-python3}"
    if [ ! -x .venv/bin/python ]; then
        echo "cleanai: creating .venv with $python" >&2
        "$python" -m venv .venv
    fi
    local stamp=".venv/.cleanai-installed-$extra"
    local want
    want="$(cat pyproject.toml constraints-ci.txt | sha256sum | cut -d' ' -f1)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
        && .venv/bin/python -c "import cleanai" 2>/dev/null; then
        return 0
    fi
    echo "cleanai: installing .[$extra] into .venv (the first time takes a minute or two)" >&2
    # pip -q still warns about every missing local index folder pip.conf names; drop those.
    .venv/bin/python -m pip install -q -c constraints-ci.txt -e ".[$extra]" 2>&1 \
        | { grep -v 'is ignored: it is neither a file nor a directory' || true; } >&2
    echo "$want" > "$stamp"
}
