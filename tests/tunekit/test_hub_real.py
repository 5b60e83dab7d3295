"""A push to the real Hugging Face Hub (``HF_ENDPOINT`` if set), run only when ``HF_TOKEN`` is set.

It creates two private repos under the token's user (the tiny base, pushed
with ``push_base``, and the adapter), checks what landed there, and deletes
both.
"""

from __future__ import annotations

import os
import uuid

import pytest
from _hub_runs import finished_run

pytestmark = [pytest.mark.hub, pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get("HF_TOKEN"), reason="needs HF_TOKEN (pushes to the real Hub)")]


def test_push_to_the_real_hub(tmp_path, monkeypatch):
    from huggingface_hub import HfApi, ModelCard, constants, hf_hub_download

    from tunekit.hub import push_to_hub
    from tunekit.hub.access import hub_endpoint

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the test suite runs offline by default
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    run = finished_run(tmp_path)
    api = HfApi(endpoint=hub_endpoint())
    repo = f"{api.whoami()['name']}/tunekit-hub-test-{uuid.uuid4().hex[:8]}"
    try:
        result = push_to_hub(run, repo, push_base=True)
        assert api.model_info(repo).private and api.model_info(f"{repo}-base").private
        assert set(api.list_repo_files(repo)) >= {"README.md", "adapter_config.json", "adapter_model.safetensors",
                                                  "tunekit_base.json", "tunekit_push.json"}
        assert [c.commit_id for c in api.list_repo_commits(repo)][0] == result.commit
        weights = hf_hub_download(repo, "adapter_model.safetensors", endpoint=api.endpoint,
                                  cache_dir=tmp_path / "cache")
        assert open(weights, "rb").read() == (run / "adapter" / "adapter_model.safetensors").read_bytes()
        card = ModelCard(open(hf_hub_download(repo, "README.md", endpoint=api.endpoint, cache_dir=tmp_path / "cache"),
                              encoding="utf-8").read())
        assert card.data.base_model == f"{repo}-base" and card.data.library_name == "peft"
    finally:
        for name in (repo, f"{repo}-base"):
            api.delete_repo(name, missing_ok=True)
