//! The judge over an OpenAI-compatible endpoint, against a local HTTP server: the request's path,
//! authorization and body, the reply parsed into scores, malformed replies and HTTP errors reported.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use supportlm_model::generate::StopReason;
use supportlm_prompting::judge::{HttpJudge, Judge};
use supportlm_prompting::respond::Response;

/// What one request carried: request line, authorization header, body.
type Seen = (String, String, String);

/// Serves `replies` (status, body) to one request each and returns what each request carried.
fn server(replies: Vec<(u16, String)>) -> (String, std::thread::JoinHandle<Vec<Seen>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for (status, body) in replies {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            let (mut length, mut auth) = (0usize, String::new());
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let l = line.trim_end();
                if l.is_empty() {
                    break;
                }
                let lower = l.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
                if lower.starts_with("authorization:") {
                    auth = l["authorization:".len()..].trim().to_string();
                }
            }
            let mut buf = vec![0u8; length];
            reader.read_exact(&mut buf).unwrap();
            seen.push((
                request_line.trim().to_string(),
                auth,
                String::from_utf8(buf).unwrap(),
            ));
            let mut stream = stream;
            write!(
                stream,
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
        }
        seen
    });
    (url, handle)
}

fn response() -> Response {
    Response {
        id: 7,
        message: "I want to cancel order 123".into(),
        category: "ORDER".into(),
        reference: "I understand you want to cancel order {{Order Number}}...".into(),
        generated: "Sure, I can help you cancel it. Go to Your Orders and choose Cancel.".into(),
        tokens: 17,
        seconds: 0.5,
        stop: StopReason::Eos,
    }
}

fn chat_reply(content: &str) -> String {
    serde_json::json!({"choices": [{"message": {"role": "assistant", "content": content}}]})
        .to_string()
}

#[test]
fn judges_through_an_openai_compatible_endpoint() {
    let (url, handle) = server(vec![
        (
            200,
            chat_reply("{\"relevance\": 5, \"politeness\": 2, \"actionable\": 2, \"rationale\": \"Clear steps.\"}"),
        ),
        (200, chat_reply("Looks fine to me!")),
        (200, "not json".into()),
        (401, "{\"error\": \"bad key\"}".into()),
    ]);
    let judge = Judge::Http(HttpJudge {
        url,
        model: "judge-model".into(),
        api_key: Some("sk-test".into()),
        timeout: Duration::from_secs(10),
    });
    let v = judge.judge(&response()).unwrap();
    let s = v.scores.unwrap();
    assert_eq!(
        (s.relevance, s.politeness, s.actionable, s.total()),
        (5, 2, 2, 9)
    );
    assert_eq!(v.rationale, "Clear steps.");
    // An answer without scores is kept and reported, not guessed.
    let v = judge.judge(&response()).unwrap();
    assert!(v.scores.is_none());
    assert_eq!(v.raw, "Looks fine to me!");
    assert!(v.error.unwrap().contains("no JSON"));
    // A broken reply or an HTTP error is an error naming the endpoint.
    let err = judge.judge(&response()).unwrap_err().to_string();
    assert!(
        err.contains("not JSON") && err.contains("/v1/chat/completions"),
        "{err}"
    );
    let err = judge.judge(&response()).unwrap_err().to_string();
    assert!(err.contains("401"), "{err}");

    let seen = handle.join().unwrap();
    let (line, auth, body) = &seen[0];
    assert_eq!(line, "POST /v1/chat/completions HTTP/1.1");
    assert_eq!(auth, "Bearer sk-test");
    let body: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["model"], "judge-model");
    assert_eq!(body["temperature"], 0);
    assert_eq!(body["messages"][0]["role"], "system");
    let user = body["messages"][1]["content"].as_str().unwrap();
    assert!(user.contains("I want to cancel order 123") && user.contains("Your Orders"));
}

#[test]
fn an_unreachable_endpoint_is_a_clear_error() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let judge = Judge::Http(HttpJudge {
        url: format!("http://127.0.0.1:{port}/v1/chat/completions"),
        model: "m".into(),
        api_key: None,
        timeout: Duration::from_secs(5),
    });
    let err = judge.judge(&response()).unwrap_err().to_string();
    assert!(
        err.contains(&format!("127.0.0.1:{port}/v1/chat/completions")),
        "{err}"
    );
}

#[test]
fn a_local_judge_scores_every_criterion_within_its_range() {
    use supportlm_model::config::Architecture;
    use supportlm_model::{default_device, tiny, Model};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny");
    tiny::write_hf_dir(&path, &tiny::config(Architecture::Llama), 3, 1).unwrap();
    let model = Model::load(&path, &default_device()).unwrap();
    let judge = Judge::Local {
        model: &model,
        name: "tiny".into(),
        constrained: true,
    };
    let v = judge.judge(&response()).unwrap();
    let s = v.scores.expect("constrained answers always parse");
    assert!(s.relevance <= 5 && s.politeness <= 3 && s.actionable <= 2);
    assert!(v.raw.contains("\"relevance\":"), "{}", v.raw);
    // Deterministic.
    assert_eq!(judge.judge(&response()).unwrap(), v);
}
