//! The `herald-bench` binary's command line: no server is assumed, so a mode without its URL
//! flags prints the usage and exits 2 instead of measuring whatever listens on a default port.

use std::process::{Command, Output};

const BENCH: &str = env!("CARGO_BIN_EXE_herald-bench");

fn run(args: &[&str]) -> Output {
    Command::new(BENCH)
        .args(args)
        .output()
        .expect("run herald-bench")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn no_arguments_print_the_usage_and_exit_2() {
    let output = run(&[]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let text = stderr(&output);
    assert!(text.contains("Usage: herald-bench"), "{text}");
    for mode in ["fanout", "slow", "idle", "echo", "handshakes", "storm"] {
        assert!(text.contains(mode), "the usage lists {mode}: {text}");
    }
    assert!(output.stdout.is_empty(), "no report: {output:?}");
}

#[test]
fn every_mode_needs_the_server_url() {
    // `--timeout` bounds the run should a mode ever start measuring again without its URLs.
    for (mode, missing) in [
        (
            &["fanout"][..],
            &["--sub-url", "--pub-url", "--pub-ws-url"][..],
        ),
        (
            &["fanout", "--sub-url", "ws://h/ws"],
            &["--pub-url", "--pub-ws-url"],
        ),
        (&["fanout", "--pub-url", "http://h/p"], &["--sub-url"]),
        (&["slow"], &["--sub-url", "--pub-url"]),
        (&["idle"], &["--url"]),
        (&["echo"], &["--url"]),
        (&["handshakes"], &["--url"]),
        (&["storm"], &["--url", "--pub-url"]),
        (&["storm", "--url", "ws://h/ws"], &["--pub-url"]),
    ] {
        let mut args = vec!["--timeout", "20s"];
        args.extend_from_slice(mode);
        let output = run(&args);
        assert_eq!(output.status.code(), Some(2), "{mode:?}: {output:?}");
        let text = stderr(&output);
        assert!(
            text.contains("required arguments were not provided"),
            "{mode:?}: {text}"
        );
        assert!(
            text.contains(&format!("Usage: herald-bench {}", mode[0])),
            "{mode:?}: {text}"
        );
        for flag in missing {
            assert!(text.contains(flag), "{mode:?} names {flag}: {text}");
        }
        assert!(
            output.stdout.is_empty(),
            "{mode:?} measured nothing: {output:?}"
        );
    }
}

#[test]
fn one_publish_url_only() {
    let output = run(&[
        "fanout",
        "--sub-url",
        "ws://h/ws",
        "--pub-url",
        "http://h/p",
        "--pub-ws-url",
        "ws://h/ws",
    ]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(
        stderr(&output).contains("cannot be used with"),
        "{output:?}"
    );
}

#[test]
fn help_still_works() {
    let help = run(&["--help"]);
    assert!(help.status.success(), "{help:?}");
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("Usage: herald-bench"), "{text}");
    let fanout = run(&["fanout", "--help"]);
    assert!(fanout.status.success(), "{fanout:?}");
    let text = String::from_utf8_lossy(&fanout.stdout);
    for flag in ["--sub-url", "--pub-url", "--pub-ws-url"] {
        assert!(text.contains(flag), "fanout --help mentions {flag}: {text}");
    }
}
