//! What the call layer costs VerifyKey in allocations: nothing. A VerifyKey goes through the
//! layer (metrics on; tracing on with an unsampled `traceparent`; the default `info` log
//! filter) and the allocations on this thread are counted, against the same call made to
//! the handler alone. Its own test binary because it installs a counting global allocator,
//! which the integration suite should not run under.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::task::{Context, Poll, Waker};

use http_body::Body;
use kemon_keys::grpc::calls::{CallLayer, record_verify_code};
use kemon_keys::telemetry::metrics::{Data, Gauges};
use kemon_keys::telemetry::traces::{self, Sampling, TraceSettings};
use tower_layer::Layer;
use tower_service::Service;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

/// The system allocator, counting allocations per thread.
struct Counting;

fn count() {
    let _ = ALLOCATIONS.try_with(|a| a.set(a.get() + 1));
}

// SAFETY: every call is forwarded to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// Stands for VerifyKey's handler: decides VALID and answers an empty body.
#[derive(Clone)]
struct Verify;

struct Decided;

impl Future for Decided {
    type Output = Result<http::Response<String>, Infallible>;

    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        record_verify_code(1, "VERIFY_CODE_VALID");
        Poll::Ready(Ok(http::Response::new(String::new())))
    }
}

impl Service<http::Request<()>> for Verify {
    type Response = http::Response<String>;
    type Error = Infallible;
    type Future = Decided;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<()>) -> Decided {
        Decided
    }
}

/// Calls `service` with `request`, polls its answer and body to the end, and returns the
/// allocations that took.
fn allocations_of<S, B>(service: &mut S, request: http::Request<()>) -> u64
where
    S: Service<http::Request<()>, Response = http::Response<B>>,
    S::Error: std::fmt::Debug,
    B: Body + Unpin,
{
    let mut cx = Context::from_waker(Waker::noop());
    let before = allocations();
    let mut future = std::pin::pin!(service.call(request));
    let Poll::Ready(response) = future.as_mut().poll(&mut cx) else {
        panic!("the answer is ready at once");
    };
    let mut body = response.expect("answered").into_body();
    while let Poll::Ready(Some(_)) = Pin::new(&mut body).poll_frame(&mut cx) {}
    drop(body);
    allocations() - before
}

fn verify_request() -> http::Request<()> {
    http::Request::builder()
        .uri("/kemon.keys.v1.KeyService/VerifyKey")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        )
        .body(())
        .unwrap()
}

fn valid_verifies() -> u64 {
    let snapshot = kemon_keys::telemetry::metrics().snapshot(&Gauges::default());
    snapshot
        .families
        .iter()
        .find_map(|f| match &f.data {
            Data::Counter(points) if f.name == "kemon.verify.outcomes" => points
                .iter()
                .find(|(labels, _)| labels.contains(&("verify_code", "VERIFY_CODE_VALID")))
                .map(|(_, n)| *n),
            _ => None,
        })
        .unwrap_or(0)
}

#[test]
fn verify_through_the_call_layer_allocates_no_more_than_its_handler() {
    // Tracing on (exporting to nowhere: nothing is sampled), the default log filter.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _entered = runtime.enter();
    let settings = TraceSettings {
        sampling: Sampling {
            parent_based: true,
            ratio: 1.0,
        },
    };
    let (_layer, _tracing) =
        traces::layer::<tracing_subscriber::Registry>(&settings).expect("the OTLP exporter builds");
    assert!(traces::sampling().is_some());
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_writer(std::io::sink)
        .finish();
    // The count sees an allocation on this thread.
    let before = allocations();
    drop(std::hint::black_box(Box::new(7u64)));
    assert_eq!(allocations() - before, 1);
    tracing::subscriber::with_default(subscriber, || {
        let mut handler = Verify;
        let mut layered = CallLayer::new(Arc::new(AtomicBool::new(true))).layer(Verify);
        // Once each first: one-time set-up (the metrics' tables, thread-locals) is not per call.
        allocations_of(&mut handler, verify_request());
        allocations_of(&mut layered, verify_request());
        let counted_before = valid_verifies();

        for _ in 0..100 {
            let (request, again) = (verify_request(), verify_request());
            let alone = allocations_of(&mut handler, request);
            let through = allocations_of(&mut layered, again);
            assert_eq!(
                through,
                alone,
                "the layer allocated {} times on one VerifyKey",
                through - alone
            );
        }
        assert_eq!(valid_verifies() - counted_before, 100, "every call counted");
    });
}
