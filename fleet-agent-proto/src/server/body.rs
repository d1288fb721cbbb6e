//! Request bodies: reading a bounded JSON body, and reading what a refusal left unread.
//!
//! Why refusals read the rest of the body: an HTTP/2 server that answers before the request's
//! body has ended must reset the stream (`RST_STREAM(NO_ERROR)`) to stop the upload, and clients
//! such as curl 7.88 then drop the response they had already received — "(92) Stream error in the
//! HTTP/2 framing layer" instead of the 401 or 413. Reading the body to its end first leaves the
//! stream half-closed by the client, so the answer is the last word and nothing is reset. The
//! read is bounded ([`DRAIN_LIMIT`]) and, like every request, falls under the connection's
//! request deadline.

use http::HeaderMap;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Bytes, Incoming};
use serde::de::DeserializeOwned;

use super::{Body, error};
use crate::{CONTENT_TYPE as JSON, ErrorCode};

/// Most bytes a refusal reads (and discards) of a body it did not need, so that HTTP/2 clients
/// receive it; a longer body is answered without reading it, and on HTTP/2 its stream reset.
pub const DRAIN_LIMIT: usize = 1024 * 1024;

/// Reads and discards what is left of `body`, up to [`DRAIN_LIMIT`] bytes; the declared length,
/// when larger than that, skips the reading altogether.
pub(super) async fn drain(headers: &HeaderMap, body: &mut Incoming) {
    if body.is_end_stream() || declared_length(headers).is_some_and(|n| n > DRAIN_LIMIT as u64) {
        return;
    }
    let mut read = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { return };
        if let Some(data) = frame.data_ref() {
            read += data.len();
            if read > DRAIN_LIMIT {
                return;
            }
        }
    }
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

enum BodyError {
    TooLarge,
    Unreadable,
}

/// Reads a whole body of at most `limit` bytes. A body that arrives as one frame (a heartbeat
/// does) is handed on without a copy.
async fn read_body(body: &mut Incoming, limit: usize) -> Result<Bytes, BodyError> {
    // The first frame as it came; once a second one arrives, everything so far in `joined`.
    let mut first: Option<Bytes> = None;
    let mut joined: Option<Vec<u8>> = None;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|_| BodyError::Unreadable)?.into_data() else {
            continue; // trailers
        };
        let so_far = joined
            .as_ref()
            .map_or_else(|| first.as_ref().map_or(0, Bytes::len), Vec::len);
        if so_far + data.len() > limit {
            return Err(BodyError::TooLarge);
        }
        match (&mut joined, first.take()) {
            (Some(j), _) => j.extend_from_slice(&data),
            (None, None) => first = Some(data),
            (None, Some(f)) => {
                let mut j = Vec::with_capacity(f.len() + data.len());
                j.extend_from_slice(&f);
                j.extend_from_slice(&data);
                joined = Some(j);
            }
        }
    }
    Ok(match joined {
        Some(j) => Bytes::from(j),
        None => first.unwrap_or_default(),
    })
}

fn too_large(limit: usize) -> hyper::Response<Body> {
    error(
        ErrorCode::BodyTooLarge,
        format!("the body limit of this route is {limit} bytes"),
    )
}

/// Reads a JSON body of at most `limit` bytes (`Content-Type: application/json`). A refusal
/// leaves the rest of the body to [`drain`].
pub(super) async fn read_json<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: &mut Incoming,
    limit: usize,
) -> Result<T, hyper::Response<Body>> {
    let is_json = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case(JSON))
        });
    if !is_json {
        return Err(error(
            ErrorCode::UnsupportedMediaType,
            "send Content-Type: application/json",
        ));
    }
    if declared_length(headers).is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit));
    }
    let bytes = match read_body(body, limit).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => return Err(too_large(limit)),
        Err(BodyError::Unreadable) => {
            return Err(error(
                ErrorCode::MalformedRequest,
                "the request body could not be read",
            ));
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        error(
            ErrorCode::MalformedRequest,
            format!("invalid JSON body: {e}"),
        )
    })
}
