//! Helpers shared by the crate's unit tests.

use crate::SemanticCache;
use smartllm_embed::Embedder;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The local embedding model, truncating at `max_seq` tokens.
pub(crate) fn embedder(max_seq: usize) -> Arc<Embedder> {
    Arc::new(
        Embedder::load(&smartllm_embed::local_assets(max_seq))
            .expect("embedding assets (run packaging/fetch-assets.sh; make test does)"),
    )
}

/// Wait (up to a minute) until a background build has swapped in an IVF-SQ8 index.
pub(crate) fn wait_ivf(cache: &SemanticCache) {
    wait_index(cache, "ivf-sq8")
}

/// Wait (up to two minutes) until a background build has swapped in an
/// index of `kind` (`ivf-sq8`, `ivf-pq`).
pub(crate) fn wait_index(cache: &SemanticCache, kind: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while (cache.building() || cache.stats().index_kind != kind) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(cache.stats().index_kind, kind, "{:?}", cache.stats());
}

/// An entry for `k` with an empty answer, live for an hour.
pub(crate) fn entry_for(k: &crate::key::CacheKey) -> crate::Entry {
    let now = crate::now_secs();
    crate::Entry {
        id: 0,
        namespace: k.namespace_hex(),
        exact: hex::encode(k.exact),
        query: k.query.clone(),
        response: "{}".into(),
        route: "auto".into(),
        model: "m".into(),
        created_at: now,
        expires_at: now + 3600,
        version: 1,
        asked_ms: None,
        tenant: None,
    }
}
