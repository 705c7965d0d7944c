// A compiled gRPC pass-through for bench/serving_front.py --native: the floor of what a second hop costs when the
// forwarding is not Python. Like patcher's front it forwards Triton's unary calls as opaque bytes and never passes a
// deadline or a cancellation on (the upstream call runs on a context of its own, server#7368); it has none of the
// front's bounds beyond the message size, so it is a measuring stick, not a server to put on a public port.
//
//	GOPATH=/usr/share/gocode GO111MODULE=off go build -o grpc_hop ./bench/grpc_hop   # Debian: golang-go golang-google-grpc-dev
//	grpc_hop -listen 127.0.0.1:PORT -upstream 127.0.0.1:TRITON_GRPC_PORT
package main

import (
	"context"
	"flag"
	"log"
	"net"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

const service = "/inference.GRPCInferenceService/"

// rawCodec hands messages through as bytes; registered as "proto", it replaces protobuf for this process.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error)      { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error { *(v.(*[]byte)) = data; return nil }
func (rawCodec) Name() string                               { return "proto" }

type forwarder struct{ upstream *grpc.ClientConn }

// outgoing carries the caller's metadata (a control-plane key included) on a context with no deadline and no
// cancellation: a client that gives up never reaches tritonserver.
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

func (f forwarder) handle(_ interface{}, stream grpc.ServerStream) error {
	method, ok := grpc.MethodFromServerStream(stream)
	if !ok || !strings.HasPrefix(method, service) || strings.HasSuffix(method, "/ModelStreamInfer") {
		return status.Errorf(codes.Unimplemented, "not forwarded: %s", method)
	}
	var request, response []byte
	if err := stream.RecvMsg(&request); err != nil {
		return err
	}
	if stream.Context().Err() != nil {
		return status.Error(codes.Canceled, "the client gave up before the request was forwarded")
	}
	var trailer metadata.MD
	if err := f.upstream.Invoke(outgoing(stream.Context()), method, &request, &response, grpc.Trailer(&trailer)); err != nil {
		return err
	}
	stream.SetTrailer(trailer)
	return stream.SendMsg(&response)
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "host:port to serve on")
	upstream := flag.String("upstream", "", "tritonserver's gRPC host:port")
	maxMessage := flag.Int("max-message-bytes", 65<<20, "largest request taken")
	flag.Parse()
	encoding.RegisterCodec(rawCodec{})
	unlimited := grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(1<<31-1), grpc.MaxCallSendMsgSize(1<<31-1))
	conn, err := grpc.Dial(*upstream, grpc.WithInsecure(), unlimited)
	if err != nil {
		log.Fatal(err)
	}
	listener, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	server := grpc.NewServer(grpc.UnknownServiceHandler(forwarder{conn}.handle), grpc.MaxRecvMsgSize(*maxMessage))
	log.Fatal(server.Serve(listener))
}
