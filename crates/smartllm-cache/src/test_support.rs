//! Helpers shared by the crate's unit tests.

use smartllm_embed::Embedder;
use std::sync::Arc;

/// The local embedding model, truncating at `max_seq` tokens.
pub(crate) fn embedder(max_seq: usize) -> Arc<Embedder> {
    Arc::new(
        Embedder::load(&smartllm_embed::local_assets(max_seq))
            .expect("embedding assets (run packaging/fetch-assets.sh; make test does)"),
    )
}
