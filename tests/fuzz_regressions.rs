//! Every fuzz seed and every input the fuzzer ever crashed on (`fuzz/run.sh`
//! copies crashes into `fuzz/regressions/<target>/`) replayed through the
//! same entry points the cargo-fuzz targets call, so each stays fixed.

use smartllm_e2e::workspace_root;

fn replay(target: &str, f: fn(&[u8])) {
    let root = workspace_root().join("fuzz");
    let mut n = 0;
    for kind in ["seeds", "regressions"] {
        let Ok(dir) = std::fs::read_dir(root.join(kind).join(target)) else {
            continue;
        };
        for entry in dir.flatten() {
            let path = entry.path();
            if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            {
                continue;
            }
            eprintln!("replaying {}", path.display());
            f(&std::fs::read(&path).unwrap());
            n += 1;
        }
    }
    assert!(n > 0, "no seeds for {target} under {}", root.display());
}

#[test]
fn request_parser_seeds_and_regressions() {
    replay("request_parser", smartllm_protocol::fuzzing::request_parser);
}

#[test]
fn sse_parser_seeds_and_regressions() {
    replay("sse_parser", smartllm_protocol::fuzzing::sse_parser);
}

#[test]
fn config_loader_seeds_and_regressions() {
    replay("config_loader", smartllm_config::fuzzing::config_loader);
}

#[test]
fn admin_query_seeds_and_regressions() {
    replay("admin_query", smartllm_protocol::fuzzing::admin_query);
}
