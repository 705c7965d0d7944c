// The compiled gRPC front of `patcher serve` (patcher/triton/serving/native_front.py builds and starts it): the same
// pass-through as front.py's GrpcFront, without Python in the path. It forwards every call of Triton's gRPC service
// as opaque bytes, metadata (the control-plane key included) passed on, to tritonserver on 127.0.0.1, and never
// passes a deadline or a cancellation on (server#7368: Triton 2.51 dies when a cancellation races a response): the
// upstream call runs on a context of its own, a client that gives up gets its DEADLINE_EXCEEDED or CANCELLED from
// here, and a stream ends upstream by half-close. At most -workers unary calls are forwarded at once; one whose
// client has gone while it waited for its turn is not forwarded at all, so abandoned requests do not pile up in
// tritonserver's queues behind good ones.
//
// Bounds: a message over -max-message-bytes is refused unread (RESOURCE_EXHAUSTED), the bytes of requests being
// forwarded at once stay within -budget-bytes (a request waits for room at most -wait-s or its deadline), and an
// HTTP/2 connection with no call for 30 s is closed. Prints "listening HOST:PORT" once it is; "error: ..." and exit
// code 3 when the port cannot be bound. SIGTERM: calls under way get -grace-s, then it exits.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

const (
	service        = "/inference.GRPCInferenceService/"
	streaming      = service + "ModelStreamInfer"
	idleConnection = 30 * time.Second
	largeBytes     = 1 << 20
	reconnectWait  = 10 * time.Second // a call that found tritonserver restarting waits this long for it, then fails
	unlimited      = 1<<31 - 1
)

// rawCodec hands messages through as bytes; registered as "proto", it replaces protobuf in this process.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error)      { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error { *(v.(*[]byte)) = data; return nil }
func (rawCodec) Name() string                               { return "proto" }

// byteBudget bounds the bytes of requests being forwarded at once; take waits for room.
type byteBudget struct {
	mu          sync.Mutex
	total, used int64
	freed       chan struct{} // closed, and replaced, whenever bytes are given back
}

func newByteBudget(total int64) *byteBudget {
	return &byteBudget{total: total, freed: make(chan struct{})}
}

func (b *byteBudget) take(ctx context.Context, size int64, wait time.Duration) bool {
	if size > b.total {
		size = b.total
	}
	timer := time.NewTimer(wait)
	defer timer.Stop()
	for {
		b.mu.Lock()
		if b.used+size <= b.total {
			b.used += size
			b.mu.Unlock()
			return true
		}
		freed := b.freed
		b.mu.Unlock()
		select {
		case <-freed:
		case <-timer.C:
			return false
		case <-ctx.Done():
			return false
		}
	}
}

func (b *byteBudget) give(size int64) {
	if size > b.total {
		size = b.total
	}
	b.mu.Lock()
	b.used -= size
	close(b.freed)
	b.freed = make(chan struct{})
	b.mu.Unlock()
}

type front struct {
	upstream *grpc.ClientConn
	turns    chan struct{} // one slot per call being forwarded
	budget   *byteBudget
	wait     time.Duration
	large    int32 // a large request has passed since the memory was last given back
}

// outgoing carries the caller's metadata on a context with no deadline and no cancellation.
func outgoing(incoming context.Context) context.Context {
	md, _ := metadata.FromIncomingContext(incoming)
	kept := metadata.MD{}
	for key, values := range md {
		if strings.HasPrefix(key, ":") || strings.HasPrefix(key, "grpc-") || key == "user-agent" ||
			key == "content-type" || key == "te" {
			continue
		}
		kept[key] = values
	}
	return metadata.NewOutgoingContext(context.Background(), kept)
}

func (f *front) handle(_ interface{}, stream grpc.ServerStream) error {
	method, ok := grpc.MethodFromServerStream(stream)
	if !ok || !strings.HasPrefix(method, service) {
		return status.Errorf(codes.Unimplemented, "unknown method %s", method)
	}
	if method == streaming {
		return f.stream(method, stream)
	}
	var request, response []byte
	if err := stream.RecvMsg(&request); err != nil {
		return err
	}
	ctx := stream.Context()
	select {
	case f.turns <- struct{}{}:
		defer func() { <-f.turns }()
	case <-ctx.Done():
	}
	if ctx.Err() != nil { // its client gave up while it waited: nothing is owed
		return status.Error(codes.Canceled, "the client gave up before the request was forwarded")
	}
	size := int64(len(request))
	if !f.budget.take(ctx, size, f.wait) {
		return status.Errorf(codes.ResourceExhausted,
			"the server holds %d bytes of other requests: try again later", f.budget.total)
	}
	var trailer metadata.MD
	err := f.upstream.Invoke(outgoing(ctx), method, &request, &response, grpc.Trailer(&trailer))
	if status.Code(err) == codes.Unavailable && f.upstream.GetState() != connectivity.Ready && f.awaitUpstream(ctx) {
		err = f.upstream.Invoke(outgoing(ctx), method, &request, &response, grpc.Trailer(&trailer))
	}
	f.budget.give(size)
	if size > largeBytes {
		atomic.StoreInt32(&f.large, 1)
	}
	if err != nil {
		return err // tritonserver's status, passed on
	}
	stream.SetTrailer(trailer)
	return stream.SendMsg(&response)
}

// awaitUpstream waits until the connection to tritonserver is back (it was restarted) or the client or
// reconnectWait gives up; the context is for the wait only, no call runs on it.
func (f *front) awaitUpstream(client context.Context) bool {
	wait, cancel := context.WithTimeout(client, reconnectWait)
	defer cancel()
	f.upstream.ResetConnectBackoff()
	for {
		state := f.upstream.GetState()
		if state == connectivity.Ready {
			return true
		}
		if !f.upstream.WaitForStateChange(wait, state) {
			return false
		}
	}
}

// stream forwards a bidirectional stream; upstream it ends by half-close when the client's ends, never by
// cancellation, and its responses are drained even when the client has gone.
func (f *front) stream(method string, stream grpc.ServerStream) error {
	desc := &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}
	up, err := f.upstream.NewStream(outgoing(stream.Context()), desc, method)
	if err != nil {
		return err
	}
	go func() {
		for {
			var request []byte
			if stream.RecvMsg(&request) != nil || up.SendMsg(&request) != nil {
				break
			}
		}
		_ = up.CloseSend()
	}()
	clientGone := false
	for {
		var response []byte
		err := up.RecvMsg(&response)
		if err == io.EOF {
			stream.SetTrailer(up.Trailer())
			return nil
		}
		if err != nil {
			return err
		}
		if !clientGone && (stream.Context().Err() != nil || stream.SendMsg(&response) != nil) {
			clientGone = true
		}
	}
}

// giveBack returns the memory large requests left free to the system, once a second when one has passed.
func (f *front) giveBack() {
	for range time.Tick(time.Second) {
		if atomic.SwapInt32(&f.large, 0) == 1 {
			debug.FreeOSMemory()
		}
	}
}

func main() {
	listen := flag.String("listen", "127.0.0.1:8001", "host:port to serve on")
	upstreamAddress := flag.String("upstream", "", "tritonserver's gRPC host:port")
	maxMessage := flag.Int("max-message-bytes", 65<<20, "largest request taken")
	budgetBytes := flag.Int64("budget-bytes", 256<<20, "bytes of requests forwarded at once")
	waitS := flag.Float64("wait-s", 30, "longest wait for room in the budget")
	workers := flag.Int("workers", 16, "unary calls forwarded at once")
	graceS := flag.Float64("grace-s", 2, "time calls under way get at SIGTERM")
	flag.Parse()
	encoding.RegisterCodec(rawCodec{})

	reconnect := grpc.ConnectParams{MinConnectTimeout: 5 * time.Second,
		Backoff: backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, MaxDelay: time.Second}}
	upstream, err := grpc.Dial(*upstreamAddress, grpc.WithInsecure(), grpc.WithConnectParams(reconnect),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(unlimited), grpc.MaxCallSendMsgSize(unlimited)))
	if err != nil {
		fmt.Fprintf(os.Stderr, "error: cannot reach tritonserver at %s: %v\n", *upstreamAddress, err)
		os.Exit(3)
	}
	listener, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintf(os.Stderr, "error: gRPC port %s is in use (another server?): choose another port\n", *listen)
		os.Exit(3)
	}
	f := &front{upstream: upstream, turns: make(chan struct{}, *workers), budget: newByteBudget(*budgetBytes),
		wait: time.Duration(*waitS * float64(time.Second))}
	idle := keepalive.ServerParameters{MaxConnectionIdle: idleConnection}
	server := grpc.NewServer(grpc.UnknownServiceHandler(f.handle), grpc.MaxRecvMsgSize(*maxMessage),
		grpc.MaxSendMsgSize(unlimited), grpc.KeepaliveParams(idle))
	go f.giveBack()

	stop, stopped := make(chan os.Signal, 1), make(chan struct{})
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		defer close(stopped)
		<-stop
		done := make(chan struct{})
		go func() { server.GracefulStop(); close(done) }()
		select {
		case <-done:
		case <-time.After(time.Duration(*graceS * float64(time.Second))):
			server.Stop()
		}
	}()
	fmt.Printf("listening %s\n", listener.Addr())
	if err := server.Serve(listener); err != nil {
		fmt.Fprintf(os.Stderr, "error: %v\n", err)
		os.Exit(1)
	}
	<-stopped // Serve returns as soon as the stop begins; the calls under way finish first
	upstream.Close()
}
