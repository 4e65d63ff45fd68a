#!/usr/bin/env bash
# The Home Assistant venv the Home Assistant tests drive (tests/home_assistant.py, tests/ha_driver.py).
#
#   bash scripts/ha_env.sh            create it or reuse the cached one; the last line printed is its path
#   bash scripts/ha_env.sh --cached   print the cached venv's path, or fail without installing anything
#
# Home Assistant is pinned (HA_VERSION), and so is everything it installs: the requirements of exactly the
# integrations the test configuration loads (HA's default set plus INTEGRATIONS below, with their
# dependencies) at the versions their manifests pin, under HA's own package_constraints.txt. HA is then
# started with `hass --skip-pip`. The venv lives under ${XDG_CACHE_HOME:-~/.cache}/qwen-edge/ha-<key>, the key
# made of the pins, so a re-run (and CI on the same machine) takes seconds; the install takes a few minutes on 2
# cores. Progress goes to stderr; on failure one line says why and the pip log is kept beside the venv.
set -euo pipefail

HA_VERSION=2025.4.4
PYTHON_VERSION=3.13.0   # 2025.4.4 is the newest HA that installs on 3.13.0 (2025.5 needs >= 3.13.2)
# Loaded by the test configuration besides HA's default integrations (bootstrap.DEFAULT_INTEGRATIONS).
# ollama imports assist_pipeline (and through it stt, tts, wake_word), so its after_dependencies count too.
INTEGRATIONS="ollama conversation rest_command template onboarding config"
RESOLVER_VERSION=1      # bump when the requirement resolution below changes

die() { echo "ha_env: $*" >&2; exit 1; }

mode=install
case "${1:-}" in
  "") ;;
  --cached) mode=cached ;;
  *) die "unknown argument '$1' (use no argument or --cached)" ;;
esac

key=$(printf '%s|%s|%s|%s' "$HA_VERSION" "$PYTHON_VERSION" "$INTEGRATIONS" "$RESOLVER_VERSION" | sha256sum | cut -c1-12)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/qwen-edge
venv=$cache/ha-$HA_VERSION-py$PYTHON_VERSION-$key

ready() { [ -f "$venv/.complete" ] && "$venv/bin/python" -c "import homeassistant" 2>/dev/null; }

if ready; then echo "$venv"; exit 0; fi
[ "$mode" = cached ] && die "no cached Home Assistant venv at $venv (run scripts/ha_env.sh)"

python=${QWEN_EDGE_HA_PYTHON:-}
if [ -z "$python" ]; then
  prefix=$(pyenv prefix "$PYTHON_VERSION" 2>/dev/null) || prefix=${PYENV_ROOT:-$HOME/.pyenv}/versions/$PYTHON_VERSION
  python=$prefix/bin/python3
fi
[ -x "$python" ] \
  || die "Python $PYTHON_VERSION not found at $python (pyenv install $PYTHON_VERSION, or set QWEN_EDGE_HA_PYTHON)"

mkdir -p "$cache"
exec 9>"$venv.lock"
flock -w 1200 9 || die "timed out waiting for another ha_env.sh run (lock $venv.lock)"
if ready; then echo "$venv"; exit 0; fi   # built by the run we waited for

log=$venv.log
rm -rf "$venv"   # built in place (a venv's scripts name their interpreter by path); .complete marks it usable
echo "ha_env: installing Home Assistant $HA_VERSION into $venv (a few minutes; log: $log)" >&2
start=$(date +%s)
fail() { die "$1 failed (last lines of $log: $(grep -v '^WARNING: Location' "$log" | tail -n 2 | tr '\n' ' '))"; }

"$python" -m venv "$venv" >"$log" 2>&1 || fail "creating the venv"
"$venv/bin/python" -m pip download --no-input --no-deps -d "$venv/.wheel" "homeassistant==$HA_VERSION" >>"$log" 2>&1 \
  || fail "downloading homeassistant==$HA_VERSION"
wheel=$(ls "$venv"/.wheel/homeassistant-*.whl)

# From the wheel: HA's package_constraints.txt, which pins every dependency (without it pip backtracks for
# minutes through versions HA was never tested with), and the requirements of the integrations HA will load.
constraints=$venv/.package_constraints.txt
reqs=$("$venv/bin/python" - "$wheel" "$constraints" $INTEGRATIONS 2>>"$log" <<'EOF'
import ast, json, sys, zipfile

wheel = zipfile.ZipFile(sys.argv[1])
open(sys.argv[2], "wb").write(wheel.read("homeassistant/package_constraints.txt"))
sets = {}
for node in ast.parse(wheel.read("homeassistant/bootstrap.py")).body:
    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
        if node.targets[0].id in ("CORE_INTEGRATIONS", "DEFAULT_INTEGRATIONS", "LOGGING_AND_HTTP_DEPS_INTEGRATIONS"):
            sets[node.targets[0].id] = ast.literal_eval(node.value)
manifest = lambda d: json.loads(wheel.read(f"homeassistant/components/{d}/manifest.json"))
listed = set(sys.argv[3:])
todo = (sets["CORE_INTEGRATIONS"] | sets["DEFAULT_INTEGRATIONS"]
        | (sets["LOGGING_AND_HTTP_DEPS_INTEGRATIONS"] - {"sentry"}) | listed)
for d in listed:
    todo |= set(manifest(d).get("after_dependencies", []))
seen, reqs = set(), set()
while todo:
    d = todo.pop()
    if d in seen:
        continue
    seen.add(d)
    m = manifest(d)
    reqs.update(m.get("requirements", []))
    todo |= set(m.get("dependencies", [])) - seen
print("\n".join(sorted(reqs)))
EOF
) || fail "reading the wheel's constraints and manifests ($INTEGRATIONS)"

# shellcheck disable=SC2086  # one requirement per word
"$venv/bin/python" -m pip install --no-input -c "$constraints" "$wheel" $reqs >>"$log" 2>&1 \
  || fail "installing homeassistant==$HA_VERSION with the integrations' requirements"

echo "$reqs" >"$venv/.requirements"
rm -rf "$venv/.wheel"
touch "$venv/.complete"
echo "ha_env: ready in $(( $(date +%s) - start )) s" >&2
echo "$venv"
