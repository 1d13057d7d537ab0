//! The request-time read path: `SemanticCache::lookup` (L1, then the RocksDB
//! exact key, then embed -> FAISS top-k within the namespace's id range ->
//! verify: namespace, similarity threshold, TTL, version, precision guard) and
//! what it answers.

use crate::metric_names as m;
use crate::{ids, near_miss, now_secs, CacheError, CacheKey, Entry, Scores, SemanticCache};
use metrics::{counter, histogram};
use smartllm_config::CachePolicy;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HitKind {
    Exact,
    Semantic,
}

impl HitKind {
    pub fn header(self) -> &'static str {
        match self {
            HitKind::Exact => "hit-exact",
            HitKind::Semantic => "hit-semantic",
        }
    }
}

#[derive(Debug, Clone)]
pub enum Lookup {
    Hit {
        entry: Arc<Entry>,
        kind: HitKind,
        similarity: f32,
        /// The verifier's score, when it judged this hit.
        verifier: Option<f32>,
    },
    Miss {
        embedding: Option<Vec<f32>>,
        /// The router's task-classifier view of the same text, from the same
        /// model run (`smartllm_embed::task_vector`).
        task_vector: Option<Vec<f32>>,
        best_similarity: Option<f32>,
        rejected: Option<&'static str>,
    },
}

pub(crate) enum Verified {
    Hit(Arc<Entry>, f32, Option<f32>),
    Miss {
        best: Option<f32>,
        rejected: Option<&'static str>,
    },
}

/// Candidates the verifier judges per lookup, at most (the most similar).
const MAX_JUDGED: usize = 2;
/// IVF candidates scoring within this of the bar are scored again on their
/// stored vectors (the 8-bit codes' error is about 0.01 at most).
const RESCORE_MARGIN: f32 = 0.03;
/// With IVF-PQ codes, candidates taken per lookup: `top_k` times this, at
/// least [`COARSE_MIN_CANDIDATES`], all scored again on their stored vectors.
const COARSE_WIDEN: usize = 4;
const COARSE_MIN_CANDIDATES: usize = 32;

/// What a semantic candidate must clear to be served.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bar {
    /// Cosine similarity, at least.
    pub similarity: f32,
    /// The verifier's score, at least (`None`: no verifier).
    pub verifier: Option<f32>,
}

/// Whether `score` reaches `bar`: never when either is NaN (`score < bar`
/// is false for a NaN, which would then pass).
fn reaches(score: f32, bar: f32) -> bool {
    score >= bar
}

/// Unexpired, of the policy's version, and younger than the policy's TTL
/// now (a TTL lowered by a reload applies to what is already stored).
fn valid(e: &Entry, policy: &CachePolicy, now: u64) -> bool {
    !e.expired(now) && Fresh::of(policy).admits(e, now)
}

/// What the policy in force asks of an entry's age and version.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fresh {
    pub version: u32,
    pub ttl_secs: u64,
}

impl Fresh {
    pub(crate) fn of(policy: &CachePolicy) -> Fresh {
        Fresh {
            version: policy.version,
            ttl_secs: policy.ttl.as_secs(),
        }
    }

    fn admits(self, e: &Entry, now: u64) -> bool {
        e.version == self.version && now < e.created_at.saturating_add(self.ttl_secs)
    }
}

/// When a lookup's semantic steps ran (for the request's trace spans).
#[derive(Debug, Clone, Copy, Default)]
pub struct LookupTimes {
    pub embed: Option<(SystemTime, SystemTime)>,
    pub search: Option<(SystemTime, SystemTime)>,
}

impl SemanticCache {
    /// Look a request up. `semantic` false limits it to exact matches.
    pub async fn lookup(
        self: &Arc<Self>,
        key: &CacheKey,
        policy: &CachePolicy,
        top_k: usize,
    ) -> Result<Lookup, CacheError> {
        self.lookup_timed(key, policy, top_k, &mut LookupTimes::default())
            .await
    }

    /// [`Self::lookup`], noting in `times` when it embedded and searched.
    pub async fn lookup_timed(
        self: &Arc<Self>,
        key: &CacheKey,
        policy: &CachePolicy,
        top_k: usize,
        times: &mut LookupTimes,
    ) -> Result<Lookup, CacheError> {
        let now = now_secs();
        if let Some(e) = self.l1_get(&key.exact) {
            if valid(&e, policy, now) {
                counter!(m::LOOKUPS, "result" => "hit_exact").increment(1);
                return Ok(Lookup::Hit {
                    entry: e,
                    kind: HitKind::Exact,
                    similarity: 1.0,
                    verifier: None,
                });
            }
        }
        let this = self.clone();
        let exact = key.exact;
        let epoch = self.l1_epoch();
        let stored = tokio::task::spawn_blocking(move || this.load_exact(&exact))
            .await
            .map_err(|e| CacheError::Task(e.to_string()))??;
        if let Some(e) = stored {
            // The entry the exact key points to must be that key's (a data
            // dir someone else wrote could point it elsewhere).
            if valid(&e, policy, now)
                && e.namespace == key.namespace_hex()
                && e.exact == hex::encode(key.exact)
            {
                let e = Arc::new(e);
                self.l1_put(epoch, key.exact, e.clone());
                counter!(m::LOOKUPS, "result" => "hit_exact").increment(1);
                return Ok(Lookup::Hit {
                    entry: e,
                    kind: HitKind::Exact,
                    similarity: 1.0,
                    verifier: None,
                });
            }
        }
        if !policy.semantic {
            counter!(m::LOOKUPS, "result" => "miss").increment(1);
            return Ok(Lookup::Miss {
                embedding: None,
                task_vector: None,
                best_similarity: None,
                rejected: None,
            });
        }
        let t = Instant::now();
        let started = SystemTime::now();
        let text = crate::key::embedding_text(&key.query);
        // One model run gives the embedding, the router's task vector and
        // the token states (the verifier's), so a would-be hit runs the
        // model once more (the cached text), not twice.
        let (embedding, task_vector, states) = match self.embedder.recent_embedding(&text) {
            Some(v) => (v, self.embedder.recent_task_vector(&text), None),
            None => {
                let verifier = policy.verifier.is_some();
                let (v, t, states) = self.embedder.embed_with_task(text, verifier).await?;
                (v, Some(t), verifier.then_some(states))
            }
        };
        histogram!(m::EMBED_SECONDS).record(t.elapsed().as_secs_f64());
        times.embed = Some((started, SystemTime::now()));

        let this = self.clone();
        let (ns, query, fresh) = (key.namespace_hex(), key.query.clone(), Fresh::of(policy));
        let bar = Bar {
            similarity: policy.similarity_threshold,
            verifier: policy.verifier,
        };
        let probe = embedding.clone();
        let started = SystemTime::now();
        let found = tokio::task::spawn_blocking(move || {
            let found = this.search_verify(
                &probe,
                &ns,
                &query,
                states.as_deref(),
                bar,
                fresh,
                top_k,
                now,
            );
            // A miss is stored next: its paraphrases will be verified
            // against these token states.
            if let (Ok(Verified::Miss { .. }), Some(states)) = (&found, states) {
                this.keep_states(&query, states.into());
            }
            found
        })
        .await
        .map_err(|e| CacheError::Task(e.to_string()))??;
        times.search = Some((started, SystemTime::now()));
        match found {
            Verified::Hit(e, sim, verifier) => {
                histogram!(m::SIMILARITY).record(sim as f64);
                counter!(m::LOOKUPS, "result" => "hit_semantic").increment(1);
                Ok(Lookup::Hit {
                    entry: e,
                    kind: HitKind::Semantic,
                    similarity: sim,
                    verifier,
                })
            }
            Verified::Miss { best, rejected } => {
                if let Some(b) = best {
                    histogram!(m::SIMILARITY).record(b as f64);
                }
                // Refused by the verifier, or by the precision guard (and
                // the window's end); else nothing came near enough.
                let result = match rejected {
                    Some("verifier" | "verifier_unavailable") => "miss_verifier",
                    Some(_) => "miss_guard",
                    None => "miss",
                };
                counter!(m::LOOKUPS, "result" => result).increment(1);
                Ok(Lookup::Miss {
                    embedding: Some(embedding),
                    task_vector,
                    best_similarity: best,
                    rejected,
                })
            }
        }
    }

    /// Score `hits[i]` for each `i` in `which` on its stored vector (one
    /// batched RocksDB read), then sort `hits` by score. A candidate whose
    /// vector is gone (removed since) keeps its index score: its entry is
    /// looked up next and is gone too.
    fn rescore(
        &self,
        query: &[f32],
        hits: &mut [(u64, f32)],
        which: &[usize],
    ) -> Result<(), CacheError> {
        if which.is_empty() {
            return Ok(());
        }
        let ids: Vec<u64> = which.iter().map(|&i| hits[i].0).collect();
        for (&i, v) in which.iter().zip(self.load_vectors(&ids)?) {
            if let Some(v) = v {
                hits[i].1 = smartllm_embed::cosine(query, &v);
            }
        }
        hits.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn search_verify(
        &self,
        embedding: &[f32],
        namespace: &str,
        query: &str,
        query_states: Option<&[f32]>,
        bar: Bar,
        fresh: Fresh,
        top_k: usize,
        now: u64,
    ) -> Result<Verified, CacheError> {
        let threshold = bar.similarity;
        if !crate::index::usable(embedding) {
            // A query no score can be computed from (a NaN from the model)
            // meets nothing.
            return Ok(Verified::Miss {
                best: None,
                rejected: None,
            });
        }
        let t = Instant::now();
        // Within the namespace's id range: others' entries take no place in
        // the top k (a tag shared by another namespace is sorted out below).
        let range = ids::range(self.tagger.tag(namespace));
        // IVF-PQ scores are coarse and misorder close neighbours: a wider
        // net, every candidate scored on its stored vector, then the best
        // `top_k` of those.
        let (mut hits, scores) = self.index.search_in_scored(
            embedding,
            |scores| match scores {
                Scores::Coarse => (top_k * COARSE_WIDEN).max(COARSE_MIN_CANDIDATES),
                Scores::Exact | Scores::Close => top_k,
            },
            range,
        )?;
        match scores {
            Scores::Exact => {}
            Scores::Close => {
                // IVF-SQ8 scores come from 8-bit codes, within about 0.01
                // of the cosine: near the bar, the stored vector decides.
                let near: Vec<usize> = (0..hits.len())
                    .filter(|&i| hits[i].1 >= threshold - RESCORE_MARGIN)
                    .collect();
                self.rescore(embedding, &mut hits, &near)?;
            }
            Scores::Coarse => {
                let all: Vec<usize> = (0..hits.len()).collect();
                self.rescore(embedding, &mut hits, &all)?;
                // A NaN (sorted first by `total_cmp`) takes no place in the
                // top k; the loop below skips it anyway.
                hits.retain(|h| !h.1.is_nan());
                hits.truncate(top_k);
            }
        }
        histogram!(m::SEARCH_SECONDS).record(t.elapsed().as_secs_f64());
        let mut judged = 0;
        let mut best = None;
        let mut rejected = None;
        // The query's text past the model's window, read once (None until
        // a candidate needs it).
        let mut query_tail: Option<Option<String>> = None;
        for (id, sim) in hits {
            if sim.is_nan() {
                // A stored vector no score can be computed from (stored
                // before vectors were checked): no hit, and it says nothing
                // of the candidates after it (NaN sorts anywhere).
                continue;
            }
            let Some(e) = self.load(id)? else { continue };
            // The entry must be the one stored under this id (its id is
            // inside the sealed bytes): an entry moved under another id
            // would answer the question that id's vector stands for.
            if e.namespace != namespace || e.id != id {
                continue;
            }
            if best.is_none() {
                best = Some(sim);
            }
            if !reaches(sim, threshold) {
                break;
            }
            if e.expired(now) || !fresh.admits(&e, now) {
                continue;
            }
            // (The nearest refused candidate's reason is the one kept.)
            if let Some(why) = near_miss(query, &e.query) {
                rejected.get_or_insert(why);
                continue;
            }
            let ours = query_tail.get_or_insert_with(|| unread_tail(&self.embedder, query));
            if *ours != unread_tail(&self.embedder, &e.query) {
                rejected.get_or_insert("beyond_window");
                continue;
            }
            let Some(pass) = bar.verifier else {
                return Ok(Verified::Hit(Arc::new(e), sim, None));
            };
            // Each judgement may cost a model run: the best few only.
            if judged == MAX_JUDGED {
                break;
            }
            judged += 1;
            match self.verify(query, query_states, &e.query, sim) {
                Ok(score) if reaches(score, pass) => {
                    return Ok(Verified::Hit(Arc::new(e), sim, Some(score)));
                }
                Ok(_) => {
                    counter!(m::VERIFIER, "result" => "rejected").increment(1);
                    rejected.get_or_insert("verifier");
                }
                // No second opinion (the embedder is shedding load): no hit.
                Err(_) => {
                    counter!(m::VERIFIER, "result" => "unavailable").increment(1);
                    rejected.get_or_insert("verifier_unavailable");
                }
            }
        }
        Ok(Verified::Miss { best, rejected })
    }

    /// The verifier's score of a candidate pair (blocking: the texts' token
    /// states come from the embedder's threads; `query_states`, when the
    /// caller has them, spare the query's run).
    pub fn verify(
        &self,
        query: &str,
        query_states: Option<&[f32]>,
        cached: &str,
        similarity: f32,
    ) -> Result<f32, CacheError> {
        use std::hash::BuildHasher;
        if crate::same_wording(query, cached) {
            return Ok(1.0);
        }
        let key = self.verdict_hasher.hash_one((query, cached));
        if let Some(score) = self
            .verdicts
            .try_lock()
            .ok()
            .and_then(|mut v| v.get(&key).copied())
        {
            return Ok(score);
        }
        let score = self.verify_uncached(query, query_states, cached, similarity)?;
        if let Ok(mut v) = self.verdicts.try_lock() {
            v.put(key, score);
        }
        Ok(score)
    }

    /// Keep a (to be) cached prompt's token states for the verifier.
    fn keep_states(&self, text: &str, states: Arc<[f32]>) {
        use std::hash::BuildHasher;
        if states.len() > crate::MAX_KEPT_STATES {
            return;
        }
        let key = self.verdict_hasher.hash_one(text);
        if let Ok(mut k) = self.cached_states.try_lock() {
            k.put(key, states);
        }
    }

    fn verify_uncached(
        &self,
        query: &str,
        query_states: Option<&[f32]>,
        cached: &str,
        similarity: f32,
    ) -> Result<f32, CacheError> {
        use std::hash::BuildHasher;
        if let Some(score) = score_differing_parts(&self.embedder, query, cached) {
            return Ok(score?);
        }
        let key = self.verdict_hasher.hash_one(cached);
        let kept = self
            .cached_states
            .try_lock()
            .ok()
            .and_then(|mut k| k.get(&key).cloned());
        let mut texts = Vec::new();
        if kept.is_none() {
            texts.push(crate::key::embedding_text(cached));
        }
        if query_states.is_none() {
            texts.push(crate::key::embedding_text(query));
        }
        let mut states = self.embedder.token_states_blocking(texts)?.into_iter();
        let b: Arc<[f32]> = match kept {
            Some(b) => b,
            None => {
                let b: Arc<[f32]> = states.next().unwrap_or_default().into();
                self.keep_states(cached, b.clone());
                b
            }
        };
        let own;
        let a = match query_states {
            Some(a) => a,
            None => {
                own = states.next().unwrap_or_default();
                own.as_slice()
            }
        };
        if a.is_empty() || b.is_empty() {
            return Err(CacheError::Task(
                "the embedder answered the wrong number of texts".into(),
            ));
        }
        Ok(
            crate::Verifier::for_model(&self.embedder.info().model).score_pair(
                similarity,
                a,
                &b,
                smartllm_embed::DIM,
            ),
        )
    }
}

/// Whether two texts differ past the model's window (`max_seq_len`
/// tokens): their embeddings, and the verifier's token states, come
/// from their beginnings alone, so a long shared beginning (rules or a
/// template before the question) makes any two endings look alike. A
/// pair either of which runs past the window is a hit only when what
/// follows the window is the same in both (blocking: tokenizes both).
/// (Also for `/admin/cache/explain`.)
pub fn unread_tails_differ(embedder: &smartllm_embed::Embedder, query: &str, cached: &str) -> bool {
    unread_tail(embedder, query) != unread_tail(embedder, cached)
}

/// The verifier's pass judgement of two prompts that share a frame
/// ([`crate::guard::differing_parts`]: a context or template around the
/// question) made on the parts they differ in, embedded on their own (one
/// model run of both; blocking): the verifier's score of
/// [`differing_parts_features`], which is 0 when the parts' cosine is under
/// [`VERIFIER_MIN_COSINE`] (the verifier only ever judges pairs at least
/// that close), and 1 when the parts are worded the same. `None` when the
/// prompts share no frame: the whole texts are judged.
pub fn score_differing_parts(
    embedder: &smartllm_embed::Embedder,
    query: &str,
    cached: &str,
) -> Option<Result<f32, smartllm_embed::EmbedError>> {
    let (q, c) = (
        crate::key::embedding_text(query),
        crate::key::embedding_text(cached),
    );
    let (a, b) = crate::guard::differing_parts(&q, &c)?;
    if crate::same_wording(a, b) {
        return Some(Ok(1.0));
    }
    Some(parts_features(embedder, a, b).map(|features| {
        if features[0] < VERIFIER_MIN_COSINE {
            return 0.0;
        }
        crate::Verifier::for_model(&embedder.info().model).score(&features)
    }))
}

/// The verifier's features of the parts two prompts that share a frame
/// differ in (what [`score_differing_parts`] judges; the first feature is
/// the parts' cosine), for tools that train or study the verifier. `None`
/// when the prompts share no frame.
pub fn differing_parts_features(
    embedder: &smartllm_embed::Embedder,
    query: &str,
    cached: &str,
) -> Option<Result<[f32; crate::verify::N], smartllm_embed::EmbedError>> {
    let (q, c) = (
        crate::key::embedding_text(query),
        crate::key::embedding_text(cached),
    );
    let (a, b) = crate::guard::differing_parts(&q, &c)?;
    Some(parts_features(embedder, a, b))
}

fn parts_features(
    embedder: &smartllm_embed::Embedder,
    a: &str,
    b: &str,
) -> Result<[f32; crate::verify::N], smartllm_embed::EmbedError> {
    let states = embedder.token_states_blocking(vec![a.to_string(), b.to_string()])?;
    let mut it = states.into_iter();
    match (it.next(), it.next(), it.next()) {
        (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
            let cosine =
                smartllm_embed::cosine(&smartllm_embed::pool(&a), &smartllm_embed::pool(&b));
            Ok(crate::verify::features(cosine, &a, &b, smartllm_embed::DIM))
        }
        _ => Err(smartllm_embed::EmbedError::Inference(
            "the embedder answered the wrong number of texts".into(),
        )),
    }
}

/// The lowest cosine of the pairs the verifiers were trained on
/// (`data/cache-eval/train_verifier.py`'s `MIN_COSINE`).
pub const VERIFIER_MIN_COSINE: f32 = 0.70;

/// What of a prompt's embedded text lies past the model's window
/// (normalised), or None when the model reads all of it.
fn unread_tail(embedder: &smartllm_embed::Embedder, text: &str) -> Option<String> {
    let t = crate::key::embedding_text(text);
    embedder
        .window_end(&t)
        .map(|end| crate::key::normalise(&t[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{embedder, wait_ivf};
    use crate::{chat_key, Codec, Purge, Sealing};
    use serde_json::json;
    use smartllm_store::Store;
    use std::time::Duration;
    const MAX_SEQ: usize = 128;
    /// Version 1, an hour (as [`policy`]).
    const FRESH: Fresh = Fresh {
        version: 1,
        ttl_secs: 3600,
    };

    fn policy() -> CachePolicy {
        CachePolicy {
            enabled: true,
            semantic: true,
            similarity_threshold: 0.9,
            ttl: Duration::from_secs(3600),
            version: 1,
            max_temperature: 1.0,
            verifier: None,
        }
    }

    fn key(tenant: &str, q: &str) -> CacheKey {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": q}]});
        chat_key(tenant, "m", body.as_object().unwrap()).unwrap()
    }

    /// A fresh cache (plain entries, the real embedder) in a temporary dir.
    fn open_cache() -> (tempfile::TempDir, Arc<SemanticCache>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let cache =
            SemanticCache::open(store, embedder(MAX_SEQ), Codec::plain(), 256, 100_000, None)
                .unwrap();
        (dir, cache)
    }

    fn is_hit(l: &Lookup) -> Option<HitKind> {
        match l {
            Lookup::Hit { kind, .. } => Some(*kind),
            Lookup::Miss { .. } => None,
        }
    }

    /// A refresh (`Cache-Control: no-cache`, or the fleet's newer entry)
    /// replaces the answer in memory too, even when another thread holds the
    /// memory cache's lock at that moment: the old answer is not served again.
    #[tokio::test]
    async fn a_refreshed_answer_replaces_the_one_in_memory() {
        let (_dir, cache) = open_cache();
        let k = key("t", "What is the capital of Peru?");
        let answer = |c: &Arc<SemanticCache>, k: CacheKey| {
            let c = c.clone();
            async move {
                match c.lookup(&k, &policy(), 8).await.unwrap() {
                    Lookup::Hit { entry, kind, .. } => {
                        assert_eq!(kind, HitKind::Exact);
                        entry.response.clone()
                    }
                    Lookup::Miss { .. } => panic!("stored, then missed"),
                }
            }
        };
        cache
            .insert(k.clone(), None, "old".into(), &policy(), "auto", "m")
            .await
            .unwrap();
        assert_eq!(answer(&cache, k.clone()).await, "old");
        let c = cache.clone();
        let (held, release) = (
            std::sync::Arc::new(std::sync::Barrier::new(2)),
            std::time::Duration::from_millis(300),
        );
        let h = held.clone();
        let holder = std::thread::spawn(move || {
            let _l1 = c.l1.lock().unwrap();
            h.wait();
            std::thread::sleep(release);
        });
        held.wait();
        cache
            .insert(k.clone(), None, "new".into(), &policy(), "auto", "m")
            .await
            .unwrap();
        holder.join().unwrap();
        assert_eq!(answer(&cache, k).await, "new");
    }

    /// A miss hands the router the question's task vector from the same
    /// model run as its embedding, with or without the verifier.
    #[tokio::test]
    async fn a_miss_carries_the_task_vector_of_its_question() {
        let (_dir, cache) = open_cache();
        let q = "Summarize: the quarterly report shows revenue up 4%";
        let e = cache.embedder.clone();
        let want = tokio::task::spawn_blocking(move || e.task_vectors_blocking(vec![q.into()]))
            .await
            .unwrap()
            .unwrap()
            .pop()
            .unwrap();
        let mut verified = policy();
        verified.verifier = Some(0.6);
        for p in [policy(), verified] {
            let Lookup::Miss {
                embedding,
                task_vector: Some(tv),
                ..
            } = cache.lookup(&key("t", q), &p, 8).await.unwrap()
            else {
                panic!("a miss with a task vector expected");
            };
            assert_eq!(tv.len(), smartllm_embed::TASK_DIM);
            assert!(tv.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5));
            // Its first half is the embedding's whole-text view (through
            // the model's task map) over sqrt(3).
            let whole = cache.embedder.whole_task_view(&embedding.unwrap());
            let first = &tv[..smartllm_embed::DIM];
            assert!(first
                .iter()
                .zip(&whole)
                .all(|(a, b)| (a * 3f32.sqrt() - b).abs() < 1e-5));
        }
    }

    /// The verifier's score of a pair is kept: asked again, the same pair
    /// is answered from the verdicts (a repeated paraphrase runs no model).
    #[tokio::test]
    async fn verifier_scores_are_kept_for_repeated_pairs() {
        let (_dir, cache) = open_cache();
        let c = cache.clone();
        let (first, second) = tokio::task::spawn_blocking(move || {
            let a = "How do I reset my password?";
            let b = "What is the way to reset my password?";
            let first = c.verify(a, None, b, 0.96).unwrap();
            assert_eq!(c.verdicts.lock().unwrap().len(), 1);
            (first, c.verify(a, None, b, 0.96).unwrap())
        })
        .await
        .unwrap();
        assert_eq!(first, second);
        assert!(first >= 0.6, "a paraphrase passes: {first}");
        assert_eq!(cache.verdicts.lock().unwrap().len(), 1);
        // The cached prompt's token states are kept for the next paraphrase,
        // which scores as if they were computed anew.
        assert_eq!(cache.cached_states.lock().unwrap().len(), 1);
        let c = cache.clone();
        let (kept, fresh) = tokio::task::spawn_blocking(move || {
            let a = "How can I reset my password?";
            let b = "What is the way to reset my password?";
            let kept = c.verify(a, None, b, 0.97).unwrap();
            c.cached_states.lock().unwrap().clear();
            (kept, c.verify_uncached(a, None, b, 0.97).unwrap())
        })
        .await
        .unwrap();
        assert!((kept - fresh).abs() < 1e-6, "{kept} {fresh}");
        assert_eq!(cache.verdicts.lock().unwrap().len(), 2);
    }

    /// Two prompts that share more than the model's window (rules before
    /// the input) embed alike whatever their endings: a different ending is
    /// no hit; the same ending after a reworded beginning still may be.
    #[tokio::test]
    async fn prompts_alike_only_in_the_models_window_are_no_hit() {
        let (_dir, cache) = open_cache();
        let rules = "When you classify the customer review below, read all of it, weigh \
            what the customer says about delivery, packaging and the product \
            itself, and answer with one word: positive, negative or mixed. "
            .repeat(4);
        let a = format!("{rules}Review: the box arrived crushed and very late.");
        let b = format!("{rules}Review: arrived early, well packed, works perfectly.");
        cache
            .insert(
                key("t", &a),
                None,
                "negative".into(),
                &policy(),
                "auto",
                "m",
            )
            .await
            .unwrap();
        match cache.lookup(&key("t", &b), &policy(), 8).await.unwrap() {
            Lookup::Miss {
                best_similarity,
                rejected,
                ..
            } => {
                assert!(best_similarity.unwrap() > 0.99, "{best_similarity:?}");
                assert_eq!(rejected, Some("beyond_window"));
            }
            Lookup::Hit { .. } => panic!("another review's answer served"),
        }
        let c = cache.clone();
        let (a2, b2) = (a.clone(), b.clone());
        let (same_end, other_end, short) = tokio::task::spawn_blocking(move || {
            // One word for another inside the window: the same ending.
            let reworded = a2.replacen("When you", "As you", 1);
            (
                unread_tails_differ(&c.embedder, &a2, &reworded),
                unread_tails_differ(&c.embedder, &a2, &b2),
                unread_tails_differ(&c.embedder, "What is 2 + 2?", "What's 2 + 2?"),
            )
        })
        .await
        .unwrap();
        assert!(!same_end && other_end && !short);
    }

    /// Two prompts that share a context around the question are judged on
    /// the questions: another question in the same context is no hit,
    /// although the shared words make the whole texts nearly the same.
    #[tokio::test]
    async fn a_shared_context_is_set_aside_and_the_questions_are_judged() {
        let (_dir, cache) = open_cache();
        let verified = CachePolicy {
            similarity_threshold: 0.7,
            verifier: Some(0.7),
            ..policy()
        };
        let context = "Context: you answer customers of an accounting application that \
            keeps invoices, receipts and bank feeds in one ledger. Answers are short \
            and point to the screen where a setting lives.\nQuestion: ";
        let stored = format!("{context}How do I reset my password?");
        cache
            .insert(key("t", &stored), None, "{}".into(), &verified, "auto", "m")
            .await
            .unwrap();
        let other = format!("{context}Which report shows the taxes I owe this quarter?");
        match cache.lookup(&key("t", &other), &verified, 8).await.unwrap() {
            Lookup::Miss {
                best_similarity,
                rejected,
                ..
            } => {
                // Above the bar on the whole texts: the verifier said no.
                assert!(best_similarity.unwrap() > 0.7, "{best_similarity:?}");
                assert_eq!(rejected, Some("verifier"));
            }
            Lookup::Hit { .. } => panic!("another question's answer served"),
        }
        let reworded = format!("{context}What is the way to reset my password?");
        let hit = cache
            .lookup(&key("t", &reworded), &verified, 8)
            .await
            .unwrap();
        assert!(
            matches!(hit, Lookup::Hit { .. }),
            "the same question reworded"
        );
        let c = cache.clone();
        let (framed, plain, features, questions) = tokio::task::spawn_blocking(move || {
            let (sq, so) = (
                crate::key::embedding_text(&stored),
                crate::key::embedding_text(&other),
            );
            let (q, o) = crate::guard::differing_parts(&sq, &so).unwrap();
            assert!(
                q.contains("reset my password") && !q.contains("Context"),
                "{q}"
            );
            let states = c
                .embedder
                .token_states_blocking(vec![q.into(), o.into()])
                .unwrap();
            let cosine = smartllm_embed::cosine(
                &smartllm_embed::pool(&states[0]),
                &smartllm_embed::pool(&states[1]),
            );
            (
                score_differing_parts(&c.embedder, &stored, &other),
                score_differing_parts(
                    &c.embedder,
                    "How do I reset my password?",
                    "How do I delete my account?",
                ),
                differing_parts_features(&c.embedder, &stored, &other),
                crate::verify::features(cosine, &states[0], &states[1], smartllm_embed::DIM),
            )
        })
        .await
        .unwrap();
        assert!(framed.unwrap().unwrap() < 0.7 && plain.is_none());
        // What tools record for such a pair is what a lookup judges: the
        // two questions' own features, not the whole texts'.
        let features = features.unwrap().unwrap();
        for (x, y) in features.iter().zip(&questions) {
            assert!((x - y).abs() < 1e-4, "{features:?} vs {questions:?}");
        }
    }

    /// The verifier judges at most MAX_JUDGED candidates per lookup (each
    /// may cost a model run), however many pass the cosine and the guard.
    #[tokio::test]
    async fn the_verifier_judges_only_the_best_candidates() {
        let (_dir, cache) = open_cache();
        let loose = CachePolicy {
            similarity_threshold: 0.3,
            verifier: Some(0.99),
            ..policy()
        };
        let stored = [
            "How do I reset my password?",
            "I forgot the password for my account, what should I do?",
            "How can I recover access to my email account?",
            "My account was locked after too many login attempts, how do I unlock it?",
            "How do I set up two-factor authentication on my account?",
        ];
        for q in stored {
            cache
                .insert(key("t", q), None, "{}".into(), &loose, "auto", "m")
                .await
                .unwrap();
        }
        let query = "What is the best way to get back into my account after losing my phone?";
        let v = cache
            .embedder
            .embed(
                std::iter::once(query)
                    .chain(stored)
                    .map(crate::key::embedding_text)
                    .collect(),
            )
            .await
            .unwrap();
        let candidates = stored
            .iter()
            .zip(&v[1..])
            .filter(|(q, e)| {
                smartllm_embed::cosine(&v[0], e) >= 0.3 && near_miss(query, q).is_none()
            })
            .count();
        assert!(candidates > MAX_JUDGED, "only {candidates} candidates");
        let found = cache.lookup(&key("t", query), &loose, 8).await.unwrap();
        assert!(is_hit(&found).is_none());
        assert_eq!(cache.verdicts.lock().unwrap().len(), MAX_JUDGED);
    }

    /// An entry larger than L1 keeps is served by its exact key from
    /// RocksDB, never held in memory; a smaller one replacing it is.
    #[tokio::test]
    async fn a_large_entry_is_served_without_being_kept_in_memory() {
        let (_dir, cache) = open_cache();
        let k = key(
            "t",
            &format!("Summarise: {}", "the long report ".repeat(5000)),
        );
        let big = "x".repeat(crate::storage::L1_MAX_ENTRY_BYTES);
        cache
            .insert(k.clone(), None, big.clone(), &policy(), "auto", "m")
            .await
            .unwrap();
        assert!(cache.l1_get(&k.exact).is_none());
        for _ in 0..2 {
            match cache.lookup(&k, &policy(), 8).await.unwrap() {
                Lookup::Hit { entry, kind, .. } => {
                    assert_eq!(kind, HitKind::Exact);
                    assert_eq!(entry.response, big);
                }
                Lookup::Miss { .. } => panic!("stored, then missed"),
            }
            assert!(cache.l1_get(&k.exact).is_none());
        }
        let small = key("t", "What is the capital of Peru?");
        cache
            .insert(small.clone(), None, "Lima".into(), &policy(), "auto", "m")
            .await
            .unwrap();
        assert!(cache.l1_get(&small.exact).is_some());
    }

    /// A lookup that read an entry from RocksDB just before a purge removed
    /// it must not put it back into L1, where later lookups would serve it.
    #[tokio::test]
    async fn an_entry_read_before_a_purge_does_not_return_to_l1() {
        let (_dir, cache) = open_cache();
        let k = key("t", "How do I reset my password?");
        let stored = cache
            .insert(k.clone(), None, "{}".into(), &policy(), "auto", "m")
            .await
            .unwrap();
        // The lookup's read happened (epoch taken), then the purge...
        let epoch = cache.l1_epoch();
        let c = cache.clone();
        tokio::task::spawn_blocking(move || c.purge(&Purge::All))
            .await
            .unwrap()
            .unwrap();
        // ...then the lookup tries to keep what it read.
        cache.l1_put(epoch, k.exact, stored.entry.clone());
        assert!(cache.l1_get(&k.exact).is_none());
        assert!(is_hit(&cache.lookup(&k, &policy(), 8).await.unwrap()).is_none());
        // Without a removal in between, it is kept.
        let epoch = cache.l1_epoch();
        cache.l1_put(epoch, k.exact, stored.entry);
        assert!(cache.l1_get(&k.exact).is_some());
    }

    /// Property: across thousands of random tenants (adversarial names
    /// included), prompts, paraphrases and namespaces (model, system prompt,
    /// sampling parameters), a hit only ever returns an entry stored for the
    /// same tenant and namespace. The seed is printed; set
    /// SMARTLLM_PROPTEST_SEED to replay one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_hit_ever_crosses_a_tenant_or_namespace() {
        let seed = std::env::var("SMARTLLM_PROPTEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| fastrand::u64(..));
        eprintln!("isolation property seed {seed} (SMARTLLM_PROPTEST_SEED={seed} replays it)");
        let mut rng = fastrand::Rng::with_seed(seed);
        let dir = tempfile::tempdir().unwrap();
        let emb = embedder(MAX_SEQ);
        let p = policy(); // threshold 0.9: looser than the default, so more candidates
        let store = Store::open(dir.path()).unwrap();
        let cache =
            SemanticCache::open(store, emb.clone(), Codec::plain(), 256, 100_000, None).unwrap();

        let verbs = ["reset", "change", "recover", "update", "delete"];
        let objects = [
            "password",
            "email address",
            "account",
            "username",
            "API key",
            "billing address",
        ];
        let mut prompts = Vec::new();
        for v in verbs {
            for o in objects {
                prompts.push(format!("How do I {v} my {o}?"));
                prompts.push(format!("What is the way to {v} my {o}?"));
            }
        }
        let vectors = emb.embed(prompts.clone()).await.unwrap();
        // Tenant names that differ by a byte, by case, by a separator.
        let mut tenants: Vec<String> = [
            "acme",
            "acme ",
            "ACME",
            "acme/app",
            "acme:app",
            "acme\u{0}",
            "a",
            "",
            "ac",
            "me",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        while tenants.len() < 2_000 {
            let len = rng.usize(1..12);
            let t: String = (0..len)
                .map(|_| ['a', 'b', ':', '/', '-', 'é', '0', ' '][rng.usize(..8)])
                .collect();
            tenants.push(t);
        }
        let models = ["m1", "m2"];
        let systems = [None, Some("You are terse."), Some("You are verbose.")];
        let temps = [None, Some(0.0), Some(0.7)];
        let body = |prompt: &str, ns: (usize, usize, usize)| {
            let mut messages = Vec::new();
            if let Some(sys) = systems[ns.1] {
                messages.push(json!({"role": "system", "content": sys}));
            }
            messages.push(json!({"role": "user", "content": prompt}));
            let mut b = json!({"model": models[ns.0], "messages": messages});
            if let Some(t) = temps[ns.2] {
                b["temperature"] = json!(t);
            }
            b
        };
        let tag = |tenant: &str, ns: (usize, usize, usize)| format!("{tenant:?}|{ns:?}");
        let hot = 300; // the first 300 tenants store entries; all 2,000 look up
        let mut stored = std::collections::HashSet::new();
        for _ in 0..1_200 {
            let t = &tenants[rng.usize(..hot)];
            let ns = (rng.usize(..2), rng.usize(..3), rng.usize(..3));
            let i = rng.usize(..prompts.len());
            let b = body(&prompts[i], ns);
            let k = chat_key(t, models[ns.0], b.as_object().unwrap()).unwrap();
            let answer = json!({"tag": tag(t, ns)}).to_string();
            cache
                .insert(
                    k,
                    Some(vectors[i].clone()),
                    answer,
                    &p,
                    "auto",
                    models[ns.0],
                )
                .await
                .unwrap();
            stored.insert((t.clone(), ns, i));
        }
        let (mut own_hits, mut foreign_twins) = (0, 0);
        let entries: Vec<(String, (usize, usize, usize), usize)> = stored.iter().cloned().collect();
        for n in 0..2_000 {
            let (st, sns, si) = &entries[rng.usize(..entries.len())];
            // A quarter each: the owner re-asks (or paraphrases: prompts come
            // in pairs), another tenant asks the same, the owner asks in
            // another namespace, anyone asks anything.
            let (t, ns, i) = match n % 4 {
                0 => (st, *sns, si ^ rng.usize(..2)),
                1 => (&tenants[rng.usize(..tenants.len())], *sns, *si),
                2 => (st, (rng.usize(..2), rng.usize(..3), rng.usize(..3)), *si),
                _ => (
                    &tenants[rng.usize(..tenants.len())],
                    (rng.usize(..2), rng.usize(..3), rng.usize(..3)),
                    rng.usize(..prompts.len()),
                ),
            };
            let b = body(&prompts[i], ns);
            let k = chat_key(t, models[ns.0], b.as_object().unwrap()).unwrap();
            if stored
                .iter()
                .any(|(ot, ons, oi)| *oi == i && (ot != t || *ons != ns))
            {
                foreign_twins += 1; // the same question is stored elsewhere
            }
            if let Lookup::Hit { entry, .. } = cache.lookup(&k, &p, 8).await.unwrap() {
                let got: serde_json::Value = serde_json::from_str(&entry.response).unwrap();
                assert_eq!(
                    got["tag"].as_str().unwrap(),
                    tag(t, ns),
                    "seed {seed}: tenant {t:?} namespace {ns:?} asked {:?} and got another's entry",
                    prompts[i]
                );
                own_hits += 1;
            }
        }
        eprintln!("{own_hits} own hits, {foreign_twins} lookups whose question another tenant or namespace had stored, 0 leaks");
        // Not vacuous: own entries were found, and others' twins were there to leak.
        assert!(own_hits >= 200, "seed {seed}: only {own_hits} own hits");
        assert!(
            foreign_twins >= 1_000,
            "seed {seed}: {foreign_twins} foreign twins"
        );
    }

    /// Many tenants storing the same questions cannot crowd a caller's own
    /// entry out of its top k: 1,000 tenants store the same 50 questions (the
    /// very same vectors), and every tenant's near-duplicate question (its
    /// vector slightly perturbed) hits its own entry, on the IVF index (trained
    /// in the background while the entries went in) and on the flat one (after
    /// a rebuild). A top 8 across namespaces would have missed almost all.
    #[test]
    fn own_entry_found_among_a_thousand_tenants_with_the_same_questions() {
        let (tenants, questions, top_k) = (1_000usize, 50usize, 8usize);
        let started = Instant::now();
        let dir = tempfile::tempdir().unwrap();
        let emb = embedder(MAX_SEQ);
        let topics = [
            "password",
            "invoice",
            "shipping",
            "refund",
            "account",
            "warranty",
            "login",
            "delivery",
            "subscription",
            "coupon",
        ];
        let kinds = ["reset", "change", "cancel", "track", "find"];
        let texts: Vec<String> = (0..questions)
            .map(|i| format!("How do I {} my {}?", kinds[i / 10], topics[i % 10]))
            .collect();
        let vectors = emb.embed_blocking(texts.clone()).unwrap();
        let store = Store::open(dir.path()).unwrap();
        // Trained once (at 13,000 vectors or a few more): 4x that is past 50,000.
        let cache = SemanticCache::open(store, emb, Codec::plain(), 16, 13_000, None).unwrap();
        let now = now_secs();
        let mut keys = Vec::with_capacity(tenants);
        for t in 0..tenants {
            let tenant = format!("tenant-{t}");
            let mut row = Vec::with_capacity(questions);
            for (q, text) in texts.iter().enumerate() {
                let k = key(&tenant, text);
                let entry = Entry {
                    id: 0,
                    namespace: k.namespace_hex(),
                    exact: hex::encode(k.exact),
                    query: text.clone(),
                    response: format!("{t}/{q}"),
                    route: "auto".into(),
                    model: "m".into(),
                    created_at: now,
                    expires_at: now + 3600,
                    version: 1,
                    asked_ms: None,
                    tenant: None,
                };
                cache
                    .write(entry, Some(vectors[q].clone()), k.exact)
                    .unwrap();
                row.push(k);
            }
            keys.push(row);
            cache.maybe_upgrade();
        }
        let stored_ms = started.elapsed().as_millis();
        let mut rng = fastrand::Rng::with_seed(22);
        let probe = |rng: &mut fastrand::Rng, q: usize| {
            let v: Vec<f32> = vectors[q]
                .iter()
                .map(|x| x + 0.01 * (rng.f32() - 0.5))
                .collect();
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.into_iter().map(|x| x / n).collect::<Vec<f32>>()
        };
        let check_all = |rng: &mut fastrand::Rng, what: &str| {
            let (mut sampled, mut global_misses) = (0, 0);
            for (t, row) in keys.iter().enumerate() {
                let q = (t * 7) % questions;
                let v = probe(rng, q);
                let ns = row[q].namespace_hex();
                let own = match cache
                    .search_verify(
                        &v,
                        &ns,
                        &texts[q],
                        None,
                        Bar {
                            similarity: 0.9,
                            verifier: None,
                        },
                        FRESH,
                        top_k,
                        now,
                    )
                    .unwrap()
                {
                    Verified::Hit(e, sim, _) => {
                        assert_eq!(e.response, format!("{t}/{q}"), "{what}: tenant {t}");
                        assert!(sim > 0.95, "{what}: tenant {t}: {sim}");
                        e.id
                    }
                    Verified::Miss { best, .. } => {
                        panic!("{what}: tenant {t} question {q} lost its own entry (best {best:?})")
                    }
                };
                if t % 10 == 0 {
                    sampled += 1;
                    let global = cache.index.search_all(&v, top_k);
                    global_misses += usize::from(!global.iter().any(|(id, _)| *id == own));
                }
            }
            assert!(
                global_misses * 10 >= sampled * 9,
                "{what}: a top {top_k} across namespaces missed only {global_misses} of {sampled}"
            );
        };
        wait_ivf(&cache);
        assert_eq!(cache.stats().index_vectors, tenants * questions);
        let trained_ms = started.elapsed().as_millis();
        check_all(&mut rng, "ivf");
        let ivf_ms = started.elapsed().as_millis();
        cache.set_ivf_threshold(usize::MAX);
        assert_eq!(
            cache.rebuild().unwrap(),
            crate::Rebuilt::Now(tenants * questions)
        );
        assert_eq!(cache.stats().index_kind, "flat");
        check_all(&mut rng, "flat");
        eprintln!(
            "stored {} entries by {stored_ms} ms, IVF swapped in by {trained_ms} ms, IVF lookups by {ivf_ms} ms, flat lookups by {} ms",
            tenants * questions,
            started.elapsed().as_millis()
        );
    }

    /// A unit vector: `base` (or nothing) plus uniform noise of `noise`.
    fn noisy_unit(rng: &mut fastrand::Rng, base: Option<&[f32]>, noise: f32) -> Vec<f32> {
        let v: Vec<f32> = (0..smartllm_embed::DIM)
            .map(|i| base.map_or(0.0, |b| b[i]) + noise * (rng.f32() - 0.5))
            .collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / n).collect()
    }

    /// Store entry number `i` of `k`'s namespace (its answer: "i") with
    /// vector `v`.
    fn write_numbered(cache: &SemanticCache, k: &CacheKey, i: usize, v: &[f32], now: u64) {
        let entry = Entry {
            id: 0,
            namespace: k.namespace_hex(),
            exact: format!("{i:064x}"),
            query: "How do I reset my password?".into(),
            response: format!("{i}"),
            route: "auto".into(),
            model: "m".into(),
            created_at: now,
            expires_at: now + 3600,
            version: 1,
            asked_ms: None,
            tenant: None,
        };
        let mut exact = [0u8; 32];
        exact[..8].copy_from_slice(&(i as u64).to_be_bytes());
        cache.write(entry, Some(v.to_vec()), exact).unwrap();
    }

    /// On the IVF index the similarity that meets the bar is the cosine of
    /// the stored vector, not the 8-bit codes' estimate of it.
    #[test]
    fn ivf_candidates_near_the_bar_are_scored_on_their_stored_vectors() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let cache =
            SemanticCache::open(store, embedder(MAX_SEQ), Codec::plain(), 16, 1_000, None).unwrap();
        let mut rng = fastrand::Rng::with_seed(7);
        let unit = noisy_unit;
        let k = key("t", "q");
        let now = now_secs();
        let vectors: Vec<Vec<f32>> = (0..1_200).map(|_| unit(&mut rng, None, 1.0)).collect();
        for (i, v) in vectors.iter().enumerate() {
            write_numbered(&cache, &k, i, v, now);
        }
        cache.maybe_upgrade();
        wait_ivf(&cache);
        let mut off = 0f32;
        for i in (0..1_200).step_by(40) {
            let probe = unit(&mut rng, Some(&vectors[i]), 0.01);
            let bar = Bar {
                similarity: 0.9,
                verifier: None,
            };
            let (ns, q) = (k.namespace_hex(), "How do I reset my password?");
            match cache
                .search_verify(&probe, &ns, q, None, bar, FRESH, 8, now)
                .unwrap()
            {
                Verified::Hit(e, sim, _) => {
                    assert_eq!(e.response, i.to_string());
                    let exact = smartllm_embed::cosine(&probe, &vectors[i]);
                    assert!((sim - exact).abs() < 1e-5, "entry {i}: {sim} vs {exact}");
                }
                Verified::Miss { best, .. } => panic!("entry {i} not found (best {best:?})"),
            }
            let codes = cache.index.search_all(&probe, 1)[0].1;
            off = off.max((codes - smartllm_embed::cosine(&probe, &vectors[i])).abs());
        }
        // The codes alone would have been off by this much.
        assert!(
            off > 1e-4,
            "the 8-bit codes scored exactly ({off}): the test tests nothing"
        );
    }

    /// From `pq_threshold` vectors the IVF build encodes with product
    /// quantisation: a lookup takes a wider net of candidates and scores
    /// each on its stored vector, so the coarse codes neither decide a hit
    /// nor lose the caller's entry; the index is saved and opens as PQ.
    #[test]
    fn ivf_pq_candidates_are_all_scored_on_their_stored_vectors() {
        let dir = tempfile::tempdir().unwrap();
        let emb = embedder(MAX_SEQ);
        let open = || {
            SemanticCache::open_with_pq(
                Store::open(dir.path()).unwrap(),
                emb.clone(),
                Codec::plain(),
                16,
                1_000,
                2_500,
                Some(dir.path()),
            )
            .unwrap()
        };
        let cache = open();
        let mut rng = fastrand::Rng::with_seed(11);
        let unit = noisy_unit;
        let k = key("t", "q");
        let now = now_secs();
        let n = 3_000;
        let vectors: Vec<Vec<f32>> = (0..n).map(|_| unit(&mut rng, None, 1.0)).collect();
        // 1,200 first: an SQ8 index; then past `pq_threshold` (2,500, before
        // the cache has grown 4x) it is built again as PQ.
        for (i, v) in vectors.iter().enumerate() {
            if i == 1_200 {
                cache.maybe_upgrade();
                crate::test_support::wait_index(&cache, "ivf-sq8");
            }
            write_numbered(&cache, &k, i, v, now);
        }
        cache.maybe_upgrade();
        crate::test_support::wait_index(&cache, "ivf-pq");
        let check = |cache: &SemanticCache| {
            let mut off = 0f32;
            for i in (0..n).step_by(50) {
                let probe = unit(&mut rng.clone(), Some(&vectors[i]), 0.02);
                let bar = Bar {
                    similarity: 0.9,
                    verifier: None,
                };
                let (ns, q) = (k.namespace_hex(), "How do I reset my password?");
                match cache
                    .search_verify(&probe, &ns, q, None, bar, FRESH, 8, now)
                    .unwrap()
                {
                    Verified::Hit(e, sim, _) => {
                        assert_eq!(e.response, i.to_string());
                        let exact = smartllm_embed::cosine(&probe, &vectors[i]);
                        assert!((sim - exact).abs() < 1e-5, "entry {i}: {sim} vs {exact}");
                    }
                    Verified::Miss { best, .. } => panic!("entry {i} not found (best {best:?})"),
                }
                let codes = cache.index.search_all(&probe, 1);
                off = off.max((codes[0].1 - smartllm_embed::cosine(&probe, &vectors[i])).abs());
            }
            off
        };
        let off = check(&cache);
        // PQ codes of random vectors are far from the cosine: what the
        // rescoring has to correct.
        assert!(
            off > 0.01,
            "the PQ codes scored within {off}: the test tests nothing"
        );
        cache.persist().unwrap();
        drop(cache);
        let reopened = open();
        assert_eq!(
            reopened.stats().index_kind,
            "ivf-pq",
            "{:?}",
            reopened.stats()
        );
        assert_eq!(reopened.stats().index_vectors, n);
        check(&reopened);
    }

    /// A NaN score is never a hit. On the IVF index a candidate near the bar
    /// is scored again on its stored vector; one stored with a NaN (before
    /// vectors were checked) scores NaN, which `sim < threshold` let through.
    /// A query with a NaN meets nothing.
    #[test]
    fn a_nan_score_is_no_hit() {
        let (_dir, cache) = open_cache();
        let k = key("t", "How do I reset my password?");
        let now = now_secs();
        let entry = crate::test_support::entry_for(&k);
        let id = cache.write(entry, None, k.exact).unwrap().id;
        // An IVF index holding the entry's vector (its codes score it near
        // 1) among others of its namespace's range that have no entry.
        let dim = smartllm_embed::DIM;
        let mut rng = fastrand::Rng::with_seed(3);
        let (mut data, mut labels) = (Vec::new(), Vec::new());
        for i in 0..64u64 {
            let v: Vec<f32> = (0..dim).map(|_| rng.f32() - 0.5).collect();
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            data.extend(v.into_iter().map(|x| x / n));
            labels.push(match i {
                0 => id,
                _ => ids::compose(ids::tag(id), 1_000_000 + i),
            });
        }
        let probe = data[..dim].to_vec();
        cache
            .index
            .reset(crate::VectorIndex::train_ivf(dim, &data, &labels).unwrap());
        let vectors = cache.cf(smartllm_store::CF_VECTORS);
        let store_vector = |v: &[f32]| {
            cache
                .db()
                .put_cf(vectors, id.to_be_bytes(), crate::storage::vec_to_bytes(v))
                .unwrap()
        };
        let search = |query: &[f32]| {
            let bar = Bar {
                similarity: 0.9,
                verifier: None,
            };
            cache
                .search_verify(
                    query,
                    &k.namespace_hex(),
                    &k.query,
                    None,
                    bar,
                    FRESH,
                    8,
                    now,
                )
                .unwrap()
        };
        let mut nan = probe.clone();
        nan[0] = f32::NAN;
        store_vector(&nan);
        assert!(
            matches!(search(&probe), Verified::Miss { .. }),
            "a NaN score was served"
        );
        // The same with the stored vector intact: a hit (the test tests something).
        store_vector(&probe);
        assert!(matches!(search(&probe), Verified::Hit(..)));
        assert!(matches!(
            search(&nan),
            Verified::Miss {
                best: None,
                rejected: None
            }
        ));
    }

    /// An entry the fleet sends after a purge that removes it (another
    /// gateway's backlog, or a stream read late) is not stored again; one
    /// stored after the purge is.
    #[tokio::test]
    async fn a_purge_holds_against_entries_the_fleet_sends_late() {
        let (_dir, here) = open_cache();
        let (_dir2, there) = open_cache();
        let p = policy();
        let k = key("t1", "What is our refund policy?");
        let old = there
            .insert(
                k.clone(),
                None,
                "{\"answer\":\"30 days\"}".into(),
                &p,
                "faq",
                "m",
            )
            .await
            .unwrap();
        // Purged here before the entry arrived.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert_eq!(here.purge(&Purge::Route("faq".into())).unwrap(), 0);
        assert_eq!(
            here.apply_remote(&old.sealed, old.embedding.clone())
                .unwrap(),
            crate::Applied::Purged
        );
        assert!(is_hit(&here.lookup(&k, &p, 8).await.unwrap()).is_none());
        // Another route's entries, and answers stored after the purge, arrive.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let new = there
            .insert(
                k.clone(),
                None,
                "{\"answer\":\"60 days\"}".into(),
                &p,
                "faq",
                "m",
            )
            .await
            .unwrap();
        assert_eq!(
            here.apply_remote(&new.sealed, new.embedding.clone())
                .unwrap(),
            crate::Applied::Stored
        );
        assert!(is_hit(&here.lookup(&k, &p, 8).await.unwrap()).is_some());
    }

    /// Misses of one question stored at once leave one entry and one
    /// vector, not an orphan per writer that only the semantic search finds.
    #[test]
    fn one_questions_answers_stored_at_once_leave_one_entry() {
        let (_dir, cache) = open_cache();
        let k = key("t", "How do I reset my password?");
        let now = now_secs();
        let mut v = vec![0.0f32; smartllm_embed::DIM];
        v[0] = 1.0;
        std::thread::scope(|s| {
            for i in 0..8 {
                let (cache, k, v) = (cache.clone(), k.clone(), v.clone());
                s.spawn(move || {
                    let entry = Entry {
                        id: 0,
                        namespace: k.namespace_hex(),
                        exact: hex::encode(k.exact),
                        query: k.query.clone(),
                        response: format!("{i}"),
                        route: "auto".into(),
                        model: "m".into(),
                        created_at: now,
                        expires_at: now + 3600,
                        version: 1,
                        asked_ms: None,
                        tenant: None,
                    };
                    cache.write(entry, Some(v), k.exact).unwrap();
                });
            }
        });
        assert_eq!(cache.stats().index_vectors, 1);
        let entries = cache
            .db()
            .iterator_cf(
                cache.cf(smartllm_store::CF_ENTRIES),
                rocksdb::IteratorMode::Start,
            )
            .count();
        assert_eq!(entries, 1);
    }

    /// An answer asked for before a purge and finished after it (a long
    /// stream) is not stored: the purge covers what was being answered.
    #[tokio::test]
    async fn an_answer_asked_for_before_a_purge_is_not_stored_after_it() {
        let (_dir, cache) = open_cache();
        let p = policy();
        let k = key("t1", "What is our refund policy?");
        let asked_at = crate::now_ms() - 2000;
        assert_eq!(cache.purge(&Purge::Route("faq".into())).unwrap(), 0);
        let late = cache
            .insert_asked_at(
                k.clone(),
                None,
                "{\"answer\":\"30 days\"}".into(),
                &p,
                "faq",
                "m",
                asked_at,
            )
            .await;
        assert!(matches!(late, Err(crate::CacheError::Purged)), "{late:?}");
        assert!(is_hit(&cache.lookup(&k, &p, 8).await.unwrap()).is_none());
        // Another route's answer, asked for at the same time, is stored.
        let other = cache
            .insert_asked_at(
                k.clone(),
                None,
                "{\"answer\":\"30 days\"}".into(),
                &p,
                "support",
                "m",
                asked_at,
            )
            .await;
        assert!(other.is_ok(), "{other:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tenant_purge_removes_its_entries_only_and_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let emb = embedder(MAX_SEQ);
        let p = policy();
        let open = || {
            SemanticCache::open(
                Store::open(dir.path()).unwrap(),
                emb.clone(),
                Codec::plain(),
                100,
                100_000,
                Some(dir.path()),
            )
            .unwrap()
        };
        let questions = ["How do I reset my password?", "Explain the borrow checker"];
        {
            let cache = open();
            for t in ["acme", "globex"] {
                for (i, q) in questions.iter().enumerate() {
                    let route = if i == 0 { "auto" } else { "other" };
                    cache
                        .insert(key(t, q), None, format!("{t}:{i}"), &p, route, "m")
                        .await
                        .unwrap();
                }
            }
            // Both of acme's entries (two routes, two namespaces), none of
            // globex's.
            assert_eq!(cache.purge(&Purge::Tenant("acme".into())).unwrap(), 2);
            assert_eq!(cache.purge(&Purge::Tenant("acme".into())).unwrap(), 0);
            assert_eq!(cache.purge(&Purge::Tenant("nobody".into())).unwrap(), 0);
            // An answer acme asked for before the purge and answered after
            // it is not stored.
            let late = cache
                .insert_asked_at(key("acme", "late"), None, "x".into(), &p, "auto", "m", 1)
                .await;
            assert!(matches!(late, Err(CacheError::Purged)), "{late:?}");
            store_flush(&cache);
        }
        // After a restart: acme's questions (and paraphrases) miss, globex's hit.
        let cache = open();
        assert_eq!(cache.stats().index_vectors, 2);
        for q in questions
            .iter()
            .chain(["What is the way to reset my password?"].iter())
        {
            let l = cache.lookup(&key("acme", q), &p, 8).await.unwrap();
            assert!(is_hit(&l).is_none(), "{q}: {l:?}");
        }
        for (i, q) in questions.iter().enumerate() {
            match cache.lookup(&key("globex", q), &p, 8).await.unwrap() {
                Lookup::Hit { entry, .. } => {
                    assert_eq!(entry.response, format!("globex:{i}"));
                    assert_eq!(entry.tenant.as_deref(), Some("globex"));
                }
                other => panic!("{q}: {other:?}"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lookups_inserts_isolation_purge_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let emb = embedder(MAX_SEQ);
        let p = policy();
        {
            let store = Store::open(dir.path()).unwrap();
            let cache = SemanticCache::open(
                store,
                emb.clone(),
                Codec::plain(),
                100,
                100_000,
                Some(dir.path()),
            )
            .unwrap();
            let k = key("t1", "How do I reset my password?");
            assert!(is_hit(&cache.lookup(&k, &p, 8).await.unwrap()).is_none());
            cache
                .insert(k.clone(), None, "{\"answer\":1}".into(), &p, "auto", "m")
                .await
                .unwrap();
            assert_eq!(
                is_hit(&cache.lookup(&k, &p, 8).await.unwrap()),
                Some(HitKind::Exact)
            );
            let para = cache
                .lookup(&key("t1", "What is the way to reset my password?"), &p, 8)
                .await
                .unwrap();
            assert_eq!(is_hit(&para), Some(HitKind::Semantic), "{para:?}");
            // Near-miss (negation) and another tenant: misses.
            let neg = cache
                .lookup(&key("t1", "How do I not reset my password?"), &p, 8)
                .await
                .unwrap();
            assert!(is_hit(&neg).is_none(), "{neg:?}");
            assert!(is_hit(
                &cache
                    .lookup(&key("t2", "How do I reset my password?"), &p, 8)
                    .await
                    .unwrap()
            )
            .is_none());
            // A version bump invalidates.
            let v2 = CachePolicy {
                version: 2,
                ..p.clone()
            };
            assert!(is_hit(&cache.lookup(&k, &v2, 8).await.unwrap()).is_none());
            // Replacing an exact key keeps one entry.
            cache
                .insert(k.clone(), None, "{\"answer\":2}".into(), &p, "auto", "m")
                .await
                .unwrap();
            assert_eq!(cache.stats().index_vectors, 1);
            let k2 = key("t1", "Explain the borrow checker in Rust");
            cache
                .insert(k2.clone(), None, "{\"answer\":3}".into(), &p, "other", "m")
                .await
                .unwrap();
            assert_eq!(cache.stats().index_vectors, 2);
            store_flush(&cache);
        }
        // Restart: the index is rebuilt from RocksDB and hits still work.
        let store = Store::open(dir.path()).unwrap();
        let cache = SemanticCache::open(
            store,
            emb.clone(),
            Codec::plain(),
            100,
            100_000,
            Some(dir.path()),
        )
        .unwrap();
        assert_eq!(cache.stats().index_vectors, 2);
        let hit = cache
            .lookup(&key("t1", "What is the way to reset my password?"), &p, 8)
            .await
            .unwrap();
        match hit {
            Lookup::Hit { entry, .. } => assert_eq!(entry.response, "{\"answer\":2}"),
            other => panic!("{other:?}"),
        }
        // Purge by route, then expiry via sweep, then everything.
        assert_eq!(cache.purge(&Purge::Route("other".into())).unwrap(), 1);
        assert!(is_hit(
            &cache
                .lookup(&key("t1", "Explain the borrow checker in Rust"), &p, 8)
                .await
                .unwrap()
        )
        .is_none());
        assert_eq!(cache.sweep(|e| e.version != 1).unwrap(), 0);
        assert_eq!(cache.sweep(|_| true).unwrap(), 1);
        assert_eq!(cache.stats().index_vectors, 0);
        let k = key("t9", "short lived");
        let short = CachePolicy {
            ttl: Duration::from_secs(1),
            ..p.clone()
        };
        cache
            .insert(k.clone(), None, "{}".into(), &short, "auto", "m")
            .await
            .unwrap();
        assert!(is_hit(&cache.lookup(&k, &short, 8).await.unwrap()).is_some());
        // A TTL lowered later applies to what is stored: an hour-long entry
        // is not served past a 1-second TTL.
        let long = key("t9", "stored for an hour");
        cache
            .insert(long.clone(), None, "{}".into(), &p, "auto", "m")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert!(is_hit(&cache.lookup(&long, &p, 8).await.unwrap()).is_some());
        assert!(
            is_hit(&cache.lookup(&long, &short, 8).await.unwrap()).is_none(),
            "the policy's TTL now counts, not only the one it was stored with"
        );
        assert!(
            is_hit(&cache.lookup(&k, &short, 8).await.unwrap()).is_none(),
            "expired entries are not served"
        );
        assert_eq!(cache.purge(&Purge::All).unwrap(), 2);
    }

    fn store_flush(cache: &SemanticCache) {
        cache.store.flush().unwrap();
    }

    /// The values stored in a column family.
    fn stored(cache: &SemanticCache, cf: &'static str) -> Vec<Box<[u8]>> {
        cache
            .db()
            .iterator_cf(cache.cf(cf), rocksdb::IteratorMode::Start)
            .map(|i| i.unwrap().1)
            .collect()
    }

    /// Encryption at rest over restarts: entries written in the clear are not
    /// served once a key is set (and leave RocksDB, exact keys included;
    /// their vectors at open);
    /// after a rotation, entries sealed with the old key are served and
    /// re-sealed with the new one (on read, and by the sweep); a cache without
    /// the right key serves nothing it cannot open, fails no lookup and
    /// removes none of it (the right key back, all is served).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plain_entries_are_refused_and_old_keys_are_read_and_resealed() {
        use smartllm_store::{CF_ENTRIES, CF_EXACT, CF_VECTORS};
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let keys = tempfile::tempdir().unwrap();
        let key_file = |name: &str, byte: u8| {
            let path = keys.path().join(name);
            std::fs::write(&path, [byte; 32]).unwrap();
            path
        };
        let (a, b, c) = (key_file("a", 1), key_file("b", 2), key_file("c", 3));
        let emb = embedder(MAX_SEQ);
        let p = policy();
        let open = |codec: Codec| {
            SemanticCache::open(
                Store::open(dir.path()).unwrap(),
                emb.clone(),
                codec,
                100,
                100_000,
                None,
            )
            .unwrap()
        };
        let response = |l: Lookup| match l {
            Lookup::Hit { entry, .. } => Some(entry.response.clone()),
            Lookup::Miss { .. } => None,
        };
        let password = key("t1", "How do I reset my password?");
        let borrow = key("t1", "Explain the borrow checker in Rust");
        let ownership = key("t1", "What is ownership in Rust?");

        // Written before encryption_key_file was set.
        {
            let cache = open(Codec::plain());
            for (k, answer) in [(&password, "plain-1"), (&borrow, "plain-2")] {
                cache
                    .insert(k.clone(), None, answer.into(), &p, "auto", "m")
                    .await
                    .unwrap();
            }
            // Exact only (no vector): no lookup of another question meets it.
            let exact_only = CachePolicy {
                semantic: false,
                ..p.clone()
            };
            cache
                .insert(
                    ownership.clone(),
                    None,
                    "plain-3".into(),
                    &exact_only,
                    "auto",
                    "m",
                )
                .await
                .unwrap();
            assert_eq!(
                response(cache.lookup(&password, &p, 8).await.unwrap()).as_deref(),
                Some("plain-1")
            );
        }
        // Key A: none of them is served, exactly or semantically.
        {
            let cache = open(Codec::from_key_file(&a).unwrap());
            // Their vectors (in the clear beside entries in the clear) are
            // removed at open.
            assert_eq!(cache.stats().index_vectors, 0);
            assert_eq!(
                response(cache.lookup(&password, &p, 8).await.unwrap()),
                None
            );
            let para = key("t1", "Can you explain Rust's borrow checker?");
            assert_eq!(response(cache.lookup(&para, &p, 8).await.unwrap()), None);
            // Refused entries are removed, exact keys included; the sweep
            // removes the ones never asked for exactly (no vector finds the
            // borrow checker's).
            assert_eq!(
                (
                    stored(&cache, CF_ENTRIES).len(),
                    stored(&cache, CF_EXACT).len()
                ),
                (2, 2)
            );
            assert_eq!(cache.sweep(|_| false).unwrap(), 2);
            assert_eq!(
                stored(&cache, CF_ENTRIES).len() + stored(&cache, CF_EXACT).len(),
                0
            );
            assert_eq!(cache.stats().index_vectors, 0);
            // Fresh answers are sealed with A.
            for (k, answer) in [(&password, "a-1"), (&borrow, "a-2")] {
                cache
                    .insert(k.clone(), None, answer.into(), &p, "auto", "m")
                    .await
                    .unwrap();
            }
            for bytes in stored(&cache, CF_ENTRIES) {
                assert_eq!(
                    Codec::from_key_file(&a).unwrap().open(&bytes).unwrap().1,
                    Sealing::Current
                );
            }
        }
        // Rotation: B seals, A is old. A's entries are served and re-sealed
        // with B: the one read at once, the other by the sweep.
        {
            let cache = open(Codec::from_key_files(&b, std::slice::from_ref(&a)).unwrap());
            assert_eq!(
                response(cache.lookup(&password, &p, 8).await.unwrap()).as_deref(),
                Some("a-1")
            );
            let only_b = Codec::from_key_file(&b).unwrap();
            let readable = |cache: &SemanticCache| {
                stored(cache, CF_ENTRIES)
                    .iter()
                    .filter(|v| only_b.decode(v).is_ok())
                    .count()
            };
            assert_eq!(readable(&cache), 1, "re-sealed on read");
            assert_eq!(cache.sweep(|_| false).unwrap(), 0);
            assert_eq!(readable(&cache), 2, "re-sealed by the sweep");
            assert_eq!(stored(&cache, CF_ENTRIES).len(), 2);
            cache
                .insert(ownership.clone(), None, "b-3".into(), &p, "auto", "m")
                .await
                .unwrap();
            assert_eq!(readable(&cache), 3);
            let only_a = Codec::from_key_file(&a).unwrap();
            assert!(stored(&cache, CF_ENTRIES)
                .iter()
                .all(|v| only_a.decode(v).is_err()));
        }
        // B alone: everything was re-sealed, so everything is served.
        {
            let cache = open(Codec::from_key_file(&b).unwrap());
            for (k, want) in [(&password, "a-1"), (&borrow, "a-2"), (&ownership, "b-3")] {
                assert_eq!(
                    response(cache.lookup(k, &p, 8).await.unwrap()).as_deref(),
                    Some(want)
                );
            }
        }
        // A wrong key (with a wrong old one): misses, no errors, and
        // nothing is lost: the entries and vectors are kept (at open, on
        // read and by the sweep), unread.
        {
            let cache = open(Codec::from_key_files(&c, std::slice::from_ref(&a)).unwrap());
            for k in [&password, &borrow, &ownership] {
                assert_eq!(response(cache.lookup(k, &p, 8).await.unwrap()), None);
            }
            let para = key("t1", "Can you explain Rust's borrow checker?");
            assert_eq!(response(cache.lookup(&para, &p, 8).await.unwrap()), None);
            assert_eq!(cache.sweep(|_| true).unwrap(), 0);
            assert_eq!(cache.unreadable_kept.load(Ordering::Relaxed), 3);
            assert_eq!(stored(&cache, CF_ENTRIES).len(), 3);
            assert_eq!(stored(&cache, CF_VECTORS).len(), 3);
        }
        // The right key back: everything is served again, paraphrases too.
        {
            let cache = open(Codec::from_key_file(&b).unwrap());
            for (k, want) in [(&password, "a-1"), (&borrow, "a-2"), (&ownership, "b-3")] {
                assert_eq!(
                    response(cache.lookup(k, &p, 8).await.unwrap()).as_deref(),
                    Some(want)
                );
            }
            let para = key("t1", "Can you explain Rust's borrow checker?");
            assert_eq!(
                response(cache.lookup(&para, &p, 8).await.unwrap()).as_deref(),
                Some("a-2")
            );
        }
        // Any purge under a wrong key removes what no key opens (whose it
        // is cannot be told, and a purged answer must not come back with
        // the right key), a purge of one route too.
        {
            let cache = open(Codec::from_key_file(&c).unwrap());
            assert_eq!(cache.purge(&Purge::Route("other".into())).unwrap(), 3);
            assert_eq!(
                stored(&cache, CF_ENTRIES).len() + stored(&cache, CF_VECTORS).len(),
                0
            );
        }
        let cache = open(Codec::from_key_file(&b).unwrap());
        for k in [&password, &borrow, &ownership] {
            assert_eq!(response(cache.lookup(k, &p, 8).await.unwrap()), None);
        }
    }
}
