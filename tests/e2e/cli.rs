//! The command line outside `serve`: how it behaves as one end of a pipe.

use smartllm_e2e::*;

#[test]
fn cli_output_into_a_closed_pipe_exits_quietly() {
    use std::io::Write;
    use std::process::Stdio;
    // `smartllm keys hash` reads the key from stdin, so the reader of its
    // stdout is gone before it prints (as with `smartllm ... | head -1`).
    let mut child = std::process::Command::new(bin("smartllm"))
        .args(["keys", "hash"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"sk-some-key\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
