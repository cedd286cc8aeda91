//! The body of every response: a whole one, as every route but `/sse` answers, or a stream of
//! Server-Sent Events. An enum rather than a boxed body, so that the whole bodies of the API and
//! the upgrades cost what they did: no allocation, no dynamic call, and their exact length still
//! known to hyper (`Content-Length`).

use std::convert::Infallible;
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body_util::Full;
use hyper::body::{Body, Frame, SizeHint};

use crate::sse::{EventStream, Events, StreamError};

/// A response body.
#[derive(Debug)]
pub enum ResponseBody {
    /// The whole body at once.
    Whole(Full<Bytes>),
    /// An `/sse` stream. Boxed, so that every other response (and so every HTTP connection's
    /// state in hyper) stays the size of a whole body.
    Events(Box<EventStream>),
}

impl From<Full<Bytes>> for ResponseBody {
    fn from(body: Full<Bytes>) -> Self {
        ResponseBody::Whole(body)
    }
}

/// A piece of a [`ResponseBody`]: the buffer type hyper writes.
#[derive(Debug)]
pub enum Chunk {
    /// A whole body.
    Whole(Bytes),
    /// Some events of a stream.
    Events(Events),
}

impl Buf for Chunk {
    fn remaining(&self) -> usize {
        match self {
            Chunk::Whole(bytes) => bytes.remaining(),
            Chunk::Events(events) => events.remaining(),
        }
    }

    fn chunk(&self) -> &[u8] {
        match self {
            Chunk::Whole(bytes) => bytes.chunk(),
            Chunk::Events(events) => events.chunk(),
        }
    }

    fn advance(&mut self, count: usize) {
        match self {
            Chunk::Whole(bytes) => bytes.advance(count),
            Chunk::Events(events) => events.advance(count),
        }
    }

    fn chunks_vectored<'a>(&'a self, slices: &mut [IoSlice<'a>]) -> usize {
        match self {
            Chunk::Whole(bytes) => bytes.chunks_vectored(slices),
            Chunk::Events(events) => events.chunks_vectored(slices),
        }
    }
}

impl Body for ResponseBody {
    type Data = Chunk;
    type Error = StreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Chunk>, StreamError>>> {
        match self.get_mut() {
            ResponseBody::Whole(body) => Pin::new(body).poll_frame(cx).map(|frame| {
                frame.map(|frame| {
                    frame
                        .map(|frame| frame.map_data(Chunk::Whole))
                        .map_err(|never: Infallible| match never {})
                })
            }),
            ResponseBody::Events(stream) => Pin::new(&mut **stream)
                .poll_frame(cx)
                .map(|frame| frame.map(|frame| frame.map(|frame| frame.map_data(Chunk::Events)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Whole(body) => body.is_end_stream(),
            ResponseBody::Events(stream) => stream.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Whole(body) => body.size_hint(),
            ResponseBody::Events(stream) => stream.size_hint(),
        }
    }
}
