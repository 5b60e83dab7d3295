"""tunekit.hub: push a trained adapter or merged model to the Hugging Face Hub, with a model card.

    from tunekit.hub import push_to_hub
    push_to_hub("runs/quickstart", "me/minilm-topics", base_model="sentence-transformers/all-MiniLM-L6-v2")

One atomic commit per push (``HfApi.create_commit`` with add and delete
operations and ``parent_commit``), an explicit manifest of files with no local
path in them, the adapter validity gate before upload, a merged (not
clobbered) model card, private repositories by default, and the token only
from ``HF_TOKEN`` or the cached login. ``tunekit push`` is the command line.
"""

from tunekit.hub.access import PushError, parse_repo_id
from tunekit.hub.finetune import PushAfterRunError, check_push_config, push_after_finetune
from tunekit.hub.push import LARGE_PUSH_BYTES, PushResult, promote_branch, push_to_hub

__all__ = ["LARGE_PUSH_BYTES", "PushAfterRunError", "PushError", "PushResult", "check_push_config",
           "parse_repo_id", "promote_branch", "push_after_finetune", "push_to_hub"]
