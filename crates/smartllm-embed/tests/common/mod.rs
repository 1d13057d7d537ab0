//! What the integration tests share: the fp32 reference vectors
//! (testdata/reference.json, packaging/make-reference-vectors.py).

/// The sentences, their fp32 vectors and the max_seq_len they were made at.
pub fn reference() -> (Vec<String>, Vec<Vec<f32>>, usize) {
    let dir: std::path::PathBuf = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    let text = std::fs::read_to_string(dir.join("testdata/reference.json")).unwrap();
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    let vectors = r["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    (
        strings(&r["sentences"]),
        vectors,
        r["max_seq_len"].as_u64().unwrap() as usize,
    )
}
