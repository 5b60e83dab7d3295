"""The Hub stand-in's data: versioned repositories of blobs, and the card checks it applies."""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from dataclasses import dataclass, field
from urllib.parse import unquote

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".png", ".jpg", ".gguf", ".model", ".h5")
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
# A subset of the licenses and pipeline tags the Hub accepts.
LICENSES = {"apache-2.0", "mit", "other", "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0", "llama3", "llama3.1",
            "llama3.2", "gemma", "bsd-3-clause", "openrail", "unknown"}
PIPELINE_TAGS = {"text-generation", "text-classification", "text2text-generation", "feature-extraction",
                 "token-classification", "summarization", "translation", "fill-mask", "sentence-similarity"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def git_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class Blob:
    content: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    def entry(self, path: str) -> dict:
        """The file as the tree / paths-info endpoints describe it."""
        if not self.lfs:
            return {"type": "file", "path": path, "size": len(self.content), "oid": git_oid(self.content)}
        pointer = lfs_pointer(self.sha256, len(self.content))
        return {"type": "file", "path": path, "size": len(self.content), "oid": git_oid(pointer),
                "lfs": {"oid": self.sha256, "size": len(self.content), "pointerSize": len(pointer)}}

    def oid(self) -> str:
        """What preupload reports as the remote oid (sha256 for LFS files, git sha1 for regular ones)."""
        return self.sha256 if self.lfs else git_oid(self.content)


def _now() -> str:
    """The time as the Hub writes it (huggingface_hub parses exactly this format)."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Commit:
    sha: str
    parent: str | None
    title: str
    message: str
    files: dict[str, Blob]
    date: str = field(default_factory=lambda: _now())


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        revision = unquote(revision)
        sha = self.branches.get(revision)
        if sha is None:
            sha = next((s for s in self.commits if len(revision) >= 7 and s.startswith(revision)), None)
        return self.commits.get(sha) if sha else None

    def add_commit(self, branch: str, files: dict[str, Blob], title: str, message: str = "") -> Commit:
        parent = self.branches.get(branch)
        digest = hashlib.sha1(json.dumps([parent, title, len(self.commits),
                                          sorted((p, b.oid()) for p, b in files.items())]).encode())
        commit = Commit(digest.hexdigest(), parent, title, message, files)
        self.commits[commit.sha] = commit
        self.branches[branch] = commit.sha
        return commit

    def history(self, revision: str) -> list[Commit]:
        commit, out = self.resolve(revision), []
        while commit is not None:
            out.append(commit)
            commit = self.commits.get(commit.parent) if commit.parent else None
        return out


def is_lfs(path: str, content: bytes) -> bool:
    return path.endswith(LFS_SUFFIXES) or b"\0" in content[:512]


def card_errors(content: str) -> list[str]:
    """The Hub's validate-yaml, for the keys tunekit writes."""
    match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
    if not match:
        return []
    try:
        meta = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as err:
        return [f"invalid YAML: {err}"]
    errors = []
    if not isinstance(meta, dict):
        return ["metadata must be a mapping"]
    if "license" in meta and meta["license"] not in LICENSES:
        errors.append(f'"license" must be one of [{", ".join(sorted(LICENSES))}]')
    bases = meta.get("base_model", [])
    for base in [bases] if isinstance(bases, str) else bases:
        if not isinstance(base, str) or not _HUB_ID.match(base):
            errors.append(f'"base_model" must be a Hub model id, got {base!r}')
    if "pipeline_tag" in meta and meta["pipeline_tag"] not in PIPELINE_TAGS:
        errors.append(f'"pipeline_tag" {meta["pipeline_tag"]!r} is not a known task')
    for key in ("tags", "datasets"):
        if key in meta and not (isinstance(meta[key], list) and all(isinstance(t, str) for t in meta[key])):
            errors.append(f'"{key}" must be a list of strings')
    for entry in meta.get("model-index", []) or []:
        if not (isinstance(entry, dict) and "name" in entry and isinstance(entry.get("results"), list)):
            errors.append('"model-index" entries need a name and results')
    return errors
