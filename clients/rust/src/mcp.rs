//! MCP-aware extraction: what counts as one request on an MCP endpoint is the
//! JSON-RPC call, not the HTTP request. This module reads a JSON-RPC body
//! into the calls to charge, and renders the JSON-RPC error of a denial. It
//! does no I/O; the layer reads the body and asks Tollgate.
//!
//! - A call's operation is its method; `tools/call:<tool name>`,
//!   `prompts/get:<prompt name>` and `resources/read:<uri>` name what they
//!   touch (an absent name gives `tools/call:`, which `tools/call:*` globs
//!   still match).
//! - `notifications/*` and responses (no `method`, a `result` or `error`) are
//!   never charged. Any other method is, with or without an `id`, so a
//!   caller cannot skip the limit by leaving the `id` out.
//! - A body that is not JSON-RPC is charged once, as a plain HTTP request:
//!   the MCP server will refuse it, but it still cost a request.
//! - A batch (a JSON array) is charged all or nothing, as one atomic
//!   `ShouldAllowBatch`: when any call is denied the whole body is refused,
//!   and no call takes a token.

use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::headers::ceil_secs;

/// The JSON-RPC error code of a rate-limited call. JSON-RPC leaves
/// -32000..-32099 to implementations and MCP defines none for this; 429 is
/// the HTTP status it mirrors.
pub const RATE_LIMITED_CODE: i64 = -32029;

/// The media type of a JSON-RPC denial.
pub const JSON: &str = "application/json";

/// What a POST body on an MCP endpoint asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Body {
    /// One JSON-RPC message, or a batch (a JSON array) of them.
    JsonRpc {
        /// The messages to charge, in body order.
        calls: Vec<Call>,
        /// True when the body was an array: a denial is then an array too.
        batch: bool,
    },
    /// Not JSON, or not JSON-RPC: charged once as a plain request.
    Other,
}

/// One charged JSON-RPC message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Call {
    /// Its `id`, echoed in the error of a denial; `None` if it had none.
    pub(crate) id: Option<Value>,
    /// What it does, such as `tools/call:search`. `None` when the message
    /// has no usable method (not a JSON-RPC request), so the layer's own
    /// operation applies.
    pub(crate) operation: Option<String>,
}

/// Reads a body. Never fails: anything unreadable is [`Body::Other`].
pub(crate) fn parse(bytes: &[u8]) -> Body {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(message)) => Body::JsonRpc {
            calls: charged(&message).into_iter().collect(),
            batch: false,
        },
        // JSON-RPC says an empty batch is an invalid request; charging it
        // once keeps it from being a free way to reach the server.
        Ok(Value::Array(messages)) if !messages.is_empty() => Body::JsonRpc {
            calls: messages
                .iter()
                .filter_map(|m| match m {
                    Value::Object(message) => charged(message),
                    _ => Some(Call {
                        id: None,
                        operation: None,
                    }),
                })
                .collect(),
            batch: true,
        },
        _ => Body::Other,
    }
}

/// The call to charge for one message, or `None` for a notification or a
/// response.
fn charged(message: &Map<String, Value>) -> Option<Call> {
    let id = message.get("id").cloned();
    match message.get("method") {
        Some(Value::String(method)) if method.starts_with("notifications/") => None,
        Some(Value::String(method)) => Some(Call {
            id,
            operation: Some(operation(method, message.get("params"))),
        }),
        Some(_) => Some(Call {
            id,
            operation: None,
        }),
        None if message.contains_key("result") || message.contains_key("error") => None,
        None => Some(Call {
            id,
            operation: None,
        }),
    }
}

/// The operation of a call: the method, and for the three methods that name
/// a tool, prompt or resource, that name after a colon.
pub fn operation(method: &str, params: Option<&Value>) -> String {
    let field = match method {
        "tools/call" | "prompts/get" => "name",
        "resources/read" => "uri",
        _ => return method.to_owned(),
    };
    let name = params
        .and_then(|p| p.get(field))
        .and_then(Value::as_str)
        .unwrap_or("");
    format!("{method}:{name}")
}

/// The body of a 429 for these calls: one JSON-RPC error object, or an
/// array of them (one per charged message) for a batch. `data` carries the
/// wait: `retryAfterSeconds` (rounded up, as `Retry-After`) and
/// `retryAfterMs`, or neither when no retry can pass; and the rules that
/// denied.
pub(crate) fn denial(
    calls: &[Call],
    batch: bool,
    retry_after: Option<Duration>,
    violated: &[&str],
    reason: &str,
) -> Vec<u8> {
    let mut data = json!({ "violatedPolicies": violated });
    if let Some(r) = retry_after {
        data["retryAfterSeconds"] = ceil_secs(r).into();
        data["retryAfterMs"] = u64::try_from(r.as_millis()).unwrap_or(u64::MAX).into();
    } else if !reason.is_empty() {
        data["reason"] = reason.into();
    }
    let message = if batch {
        "Rate limit exceeded: the batch was refused whole"
    } else {
        "Rate limit exceeded"
    };
    let error = |id: Option<&Value>| {
        json!({
            "jsonrpc": "2.0",
            "id": id.cloned().unwrap_or(Value::Null),
            "error": { "code": RATE_LIMITED_CODE, "message": message, "data": data },
        })
    };
    let body = if batch {
        Value::Array(calls.iter().map(|c| error(c.id.as_ref())).collect())
    } else {
        error(calls.first().and_then(|c| c.id.as_ref()))
    };
    body.to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(id: i64, operation: &str) -> Call {
        Call {
            id: Some(json!(id)),
            operation: Some(operation.to_owned()),
        }
    }

    #[test]
    fn operations_name_the_tool_prompt_or_resource() {
        let p = json!({"name": "search", "uri": "file:///a"});
        assert_eq!(operation("tools/call", Some(&p)), "tools/call:search");
        assert_eq!(operation("prompts/get", Some(&p)), "prompts/get:search");
        assert_eq!(
            operation("resources/read", Some(&p)),
            "resources/read:file:///a"
        );
        assert_eq!(operation("tools/list", Some(&p)), "tools/list");
        assert_eq!(operation("tools/call", None), "tools/call:");
    }

    #[test]
    fn a_single_call_is_charged_with_its_id() {
        let body = br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"search"}}"#;
        assert_eq!(
            parse(body),
            Body::JsonRpc {
                calls: vec![call(7, "tools/call:search")],
                batch: false
            }
        );
    }

    #[test]
    fn notifications_and_responses_are_free_but_id_less_calls_are_not() {
        let body = br#"[
            {"jsonrpc":"2.0","method":"notifications/initialized"},
            {"jsonrpc":"2.0","id":1,"result":{}},
            {"jsonrpc":"2.0","id":2,"error":{"code":1,"message":"x"}},
            {"jsonrpc":"2.0","id":"a","method":"ping"},
            {"jsonrpc":"2.0","method":"tools/call","params":{"name":"fetch"}},
            42
        ]"#;
        let Body::JsonRpc { calls, batch } = parse(body) else {
            panic!("not JSON-RPC")
        };
        assert!(batch);
        assert_eq!(
            calls,
            [
                Call {
                    id: Some(json!("a")),
                    operation: Some("ping".into())
                },
                Call {
                    id: None,
                    operation: Some("tools/call:fetch".into())
                },
                Call {
                    id: None,
                    operation: None
                },
            ]
        );
        let notification = br#"{"jsonrpc":"2.0","method":"notifications/cancelled"}"#;
        assert_eq!(
            parse(notification),
            Body::JsonRpc {
                calls: vec![],
                batch: false
            }
        );
    }

    #[test]
    fn bodies_that_are_not_json_rpc_are_charged_as_plain_requests() {
        assert_eq!(parse(b"not json"), Body::Other);
        assert_eq!(parse(b"[]"), Body::Other);
        assert_eq!(parse(b"\"a string\""), Body::Other);
    }

    #[test]
    fn a_denial_is_a_json_rpc_error_with_the_wait_in_data() {
        let body = denial(
            &[call(7, "tools/call:search")],
            false,
            Some(Duration::from_millis(2_100)),
            &["per-user"],
            "",
        );
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["id"], 7);
        assert_eq!(v["error"]["code"], RATE_LIMITED_CODE);
        assert_eq!(v["error"]["data"]["retryAfterSeconds"], 3);
        assert_eq!(v["error"]["data"]["retryAfterMs"], 2100);
        assert_eq!(v["error"]["data"]["violatedPolicies"], json!(["per-user"]));
    }

    #[test]
    fn a_batch_denial_answers_every_charged_call() {
        let calls = [
            call(1, "tools/call:a"),
            Call {
                id: None,
                operation: None,
            },
        ];
        let body = denial(
            &calls,
            true,
            None,
            &["per-user"],
            "cost 9 is over capacity 3",
        );
        let v: Value = serde_json::from_slice(&body).unwrap();
        let errors = v.as_array().unwrap();
        assert_eq!(errors.len(), 2);
        assert_eq!(errors[0]["id"], 1);
        assert_eq!(errors[1]["id"], Value::Null);
        assert_eq!(
            errors[1]["error"]["data"]["reason"],
            "cost 9 is over capacity 3"
        );
        assert!(
            errors[1]["error"]["data"]
                .get("retryAfterSeconds")
                .is_none()
        );
    }
}
