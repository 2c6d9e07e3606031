#!/usr/bin/env python3
"""Structural lint of the Dockerfile (no Docker daemon or registry needed; the images are not
built here). Run by scripts/validate-manifests.sh.

Checks that every image the README, the Dockerfile header and manifests/ name
(`--target X`, `ghcr.io/zmesh/X:`) is a stage; every COPY source exists in the build context
and is not excluded by .dockerignore; every workspace member is copied (cargo needs all their
manifests); every `-p` package exists; every binary a runtime stage copies is built and is its
ENTRYPOINT; runtime stages set USER explicitly and only ztunnel runs as root; base images are
pinned to a tag and the builder's Rust release is the workspace's rust-version.
`--self-test` checks that broken copies of the Dockerfile are caught.
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import shutil
import sys
import tempfile
from pathlib import Path

# Runtime stages allowed to run as root, and why (the Dockerfile comments say more).
ROOT_ALLOWED = {"ztunnel": "needs CAP_BPF/CAP_NET_ADMIN in its effective set"}
NONROOT_USER = "65532:65532"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if buf and s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        buf += s
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def stages(text: str) -> list[dict]:
    result = []
    for ins, args in instructions(text):
        if ins == "FROM":
            m = re.match(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?$", args, re.I)
            result.append({"base": m.group(1), "name": (m.group(2) or "").lower(), "ins": []})
        elif result:
            result[-1]["ins"].append((ins, args))
    return result


def ignored(rel: str, patterns: list[str]) -> bool:
    """.dockerignore semantics, simplified: the last matching pattern wins, `!` re-includes, a
    pattern matches a path or any of its parent directories, `**/` any leading directories."""
    parts = rel.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for p in patterns:
        neg = p.startswith("!")
        pat = (p[1:] if neg else p).strip("/")
        alts = {pat, pat[3:]} if pat.startswith("**/") else {pat}
        if any(fnmatch.fnmatch(c, a) for c in candidates for a in alts):
            result = not neg
    return result


def workspace(root: Path) -> tuple[list[str], dict[str, str], set[str], str]:
    """(member dirs, package name -> dir, binary names, rust-version)."""
    cargo = (root / "Cargo.toml").read_text()
    members = re.findall(r'"([^"]+)"', re.search(r"members\s*=\s*\[(.*?)\]", cargo, re.S).group(1))
    rust = re.search(r'rust-version\s*=\s*"([^"]+)"', cargo).group(1)
    packages, bins = {}, set()
    for m in members:
        manifest = (root / m / "Cargo.toml").read_text()
        name = re.search(r'^\[package\][^\[]*?^name\s*=\s*"([^"]+)"', manifest, re.S | re.M).group(1)
        packages[name] = m
        explicit = re.findall(r'^\[\[bin\]\][^\[]*?^name\s*=\s*"([^"]+)"', manifest, re.S | re.M)
        bins.update(explicit)
        if not explicit and (root / m / "src" / "main.rs").exists():
            bins.add(name)
    return members, packages, bins, rust


def check(root: Path) -> list[str]:
    errors: list[str] = []
    df_path = root / "Dockerfile"
    if not df_path.exists():
        return ["Dockerfile: missing"]
    text = df_path.read_text()
    st = stages(text)
    names = [s["name"] for s in st]
    ignore = []
    if (root / ".dockerignore").exists():
        ignore = [line.strip() for line in (root / ".dockerignore").read_text().splitlines()
                  if line.strip() and not line.strip().startswith("#")]
    if not any(ignored(p, ignore) for p in ("target", "target/release/ztunnel")):
        errors.append(".dockerignore: target/ must be excluded from the build context")
    members, packages, bins, rust = workspace(root)
    cargo_toml = (root / "Cargo.toml").read_text()

    # Targets that something names.
    wanted = {}
    readme = (root / "README.md").read_text() if (root / "README.md").exists() else ""
    for t in re.findall(r"docker build[^\n`]*?--target[ =]([\w.-]+)", readme):
        wanted.setdefault(t, "README.md")
    for t in re.findall(r"docker build[^\n]*?--target[ =]([\w.-]+)", text):
        wanted.setdefault(t, "the Dockerfile's header")
    for f in sorted((root / "manifests").rglob("*.yaml")) if (root / "manifests").is_dir() else []:
        for t in re.findall(r"ghcr\.io/zmesh/([\w.-]+):", f.read_text()):
            wanted.setdefault(t, str(f.relative_to(root)))
    for t, who in sorted(wanted.items()):
        if t not in names:
            errors.append(f"Dockerfile: no stage `{t}` (named by {who})")
    if not wanted:
        errors.append("Dockerfile: no target is named anywhere (README, header, manifests)")

    copied_dirs: set[str] = set()
    for i, s in enumerate(st):
        label = f"Dockerfile stage {s['name'] or i}"
        base = s["base"]
        if base.lower() not in names[:i]:
            if ":" not in base.split("/")[-1] and "@" not in base:
                errors.append(f"{label}: base image {base} has no tag")
            elif base.endswith(":latest"):
                errors.append(f"{label}: base image {base} uses :latest")
        m = re.match(r"rust:(\d+\.\d+)", base)
        if m and m.group(1) != rust:
            errors.append(f"{label}: builder is Rust {m.group(1)}, the workspace needs {rust}")
        built = " ".join(a for ins, a in s["ins"] if ins == "RUN")
        for p in re.findall(r"(?:^|\s)-p\s+([\w-]+)", built):
            if p not in packages:
                errors.append(f"{label}: cargo -p {p} is not a workspace package")
        # target/release/ or a custom profile's directory (ztunnel: target/release-ztunnel/).
        for prof, b in re.findall(r"target/(release(?:-[\w]+)?)/([\w-]+)", built):
            if b not in bins:
                errors.append(f"{label}: target/{prof}/{b} is not a binary of the workspace")
            if prof != "release" and f"[profile.{prof}]" not in cargo_toml:
                errors.append(f"{label}: target/{prof}/: no [profile.{prof}] in Cargo.toml")
        for ins, args in s["ins"]:
            if ins not in ("COPY", "ADD"):
                continue
            flags = re.findall(r"--(\w+)=(\S+)", args)
            words = [w for w in args.split() if not w.startswith("--")]
            srcs = words[:-1]
            src_stage = dict(flags).get("from")
            if src_stage:
                if src_stage.lower() not in names[:i] and ":" not in src_stage:
                    errors.append(f"{label}: COPY --from={src_stage}: no earlier stage of that name")
                    continue
                prev = st[names.index(src_stage.lower())] if src_stage.lower() in names else None
                prev_run = " ".join(a for x, a in prev["ins"] if x == "RUN") if prev else ""
                for src in srcs:
                    built_bin = rf"target/release(?:-\w+)?/{re.escape(src[5:])}(?![\w-])"
                    if src.startswith("/out/") and not re.search(built_bin, prev_run):
                        errors.append(f"{label}: {src} is not produced by stage {src_stage}")
                continue
            for src in srcs:
                if not (root / src).exists():
                    errors.append(f"{label}: COPY source {src} does not exist")
                elif ignored(src, ignore):
                    errors.append(f"{label}: COPY source {src} is excluded by .dockerignore")
                else:
                    copied_dirs.add(src.strip("/").rstrip("."))
        # Runtime stages: ENTRYPOINT copied here, explicit USER.
        entry = [a for ins, a in s["ins"] if ins == "ENTRYPOINT"]
        if entry:
            exe = re.findall(r'"([^"]+)"', entry[-1])
            copies = " ".join(a for ins, a in s["ins"] if ins == "COPY")
            if not exe or exe[0] not in copies:
                errors.append(f"{label}: ENTRYPOINT {entry[-1]} is not copied in this stage")
            users = [a for ins, a in s["ins"] if ins == "USER"]
            if not users:
                errors.append(f"{label}: runtime stage without an explicit USER")
            elif s["name"] in ROOT_ALLOWED:
                pass
            elif users[-1] != NONROOT_USER:
                errors.append(f"{label}: runs as {users[-1]}, must be non-root ({NONROOT_USER})")
            elif not base.endswith(":nonroot"):
                errors.append(f"{label}: non-root stage should use a :nonroot base image")
    # cargo loads every member's manifest, and embedded files must be in the context.
    if any("cargo build" in a for s in st for ins, a in s["ins"] if ins == "RUN"):
        for m in members:
            if m not in copied_dirs and "" not in copied_dirs:
                errors.append(f"Dockerfile: workspace member {m}/ is not copied into the build")
        for m in members:
            for rs in (root / m).rglob("*.rs"):
                for inc in re.findall(r'include_(?:str|bytes)!\(\s*"([^"]+)"', rs.read_text()):
                    target = (rs.parent / inc).resolve()
                    try:
                        rel = str(target.relative_to(root.resolve()))
                    except ValueError:
                        errors.append(f"{rs.relative_to(root)}: includes {inc}, outside the repository")
                        continue
                    if not any(rel == d or rel.startswith(d + "/") for d in copied_dirs):
                        errors.append(f"{rs.relative_to(root)}: includes {rel}, which the "
                                      "Dockerfile does not copy into the build")
    return errors


def self_test(root: Path) -> int:
    cases = [
        ("a target the README names is missing", "no stage `ztunnel`",
         lambda t: t.replace("AS ztunnel", "AS node-agent")),
        ("COPY of a path that does not exist", "does not exist",
         lambda t: t.replace("COPY cli cli", "COPY cli cli\nCOPY no-such-dir no-such-dir")),
        ("a workspace member not copied", "workspace member tests/ is not copied",
         lambda t: t.replace("COPY tests tests\n", "")),
        ("untagged base image", "has no tag",
         lambda t: t.replace("gcr.io/distroless/cc-debian12:nonroot AS zmesh-controller",
                             "gcr.io/distroless/cc-debian12 AS zmesh-controller")),
        ("controller running as root", "must be non-root",
         lambda t: t.replace("ENTRYPOINT [\"/usr/local/bin/zmesh-controller\"]",
                             "USER 0:0\nENTRYPOINT [\"/usr/local/bin/zmesh-controller\"]")),
        ("binary copied out but never built", "not produced by stage build",
         lambda t: t.replace("target/release/zmesh /out/", "/out/")),
        ("a profile directory Cargo.toml does not define", "no [profile.release-tiny]",
         lambda t: t.replace("target/release-ztunnel/ztunnel", "target/release-tiny/ztunnel")),
        ("unknown cargo package", "not a workspace package",
         lambda t: t.replace("-p zmesh-cli", "-p zmesh-client")),
    ]
    passed = failed = 0
    base_errors = check(root)
    if base_errors:
        print("dockerfile self-test: FAIL the real Dockerfile does not pass:", base_errors,
              file=sys.stderr)
        failed += 1
    else:
        passed += 1
    with tempfile.TemporaryDirectory(prefix="zmesh-dockerfile-") as tmp:
        for what, expect, mutate in cases:
            case = Path(tmp) / "case"
            if case.exists():
                shutil.rmtree(case)
            shutil.copytree(root, case, ignore=shutil.ignore_patterns(
                "target", ".git", "bench-out", "fuzz"))
            df = case / "Dockerfile"
            new = mutate(df.read_text())
            if new == df.read_text():
                print(f"dockerfile self-test: FAIL {what}: the mutation did not apply",
                      file=sys.stderr)
                failed += 1
                continue
            df.write_text(new)
            errs = check(case)
            if any(expect in e for e in errs):
                passed += 1
                print(f"dockerfile self-test: ok   {what}: caught")
            else:
                failed += 1
                print(f"dockerfile self-test: FAIL {what}: not caught (got {errs})",
                      file=sys.stderr)
    print(f"dockerfile self-test: {passed} passed, {failed} failed")
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--self-test", action="store_true")
    args = ap.parse_args()
    if args.self_test:
        return self_test(args.root)
    errors = check(args.root)
    for e in errors:
        print(f"check-dockerfile: ERROR {e}", file=sys.stderr)
    if errors:
        print(f"check-dockerfile: FAILED with {len(errors)} error(s)", file=sys.stderr)
        return 1
    print("check-dockerfile: ok: every named target exists, COPY sources exist and are in the "
          "build context, binaries built and used, non-root except ztunnel (not built here: "
          "no registry access)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
