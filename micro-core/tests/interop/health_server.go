// A grpc-go server for the SDK's interop tests: the standard health service (SERVING)
// and server reflection (grpc-go 1.33 serves v1alpha only), with grpc-go's default
// keepalive policy (a ping without calls allowed every 5 minutes, GOAWAY
// too_many_pings after two strikes). Prints "listening on PORT" once it listens on
// 127.0.0.1, then "accepted N" for each connection it accepts; runs until killed.
//
// Built in GOPATH mode against Debian's golang-google-grpc-dev, with no module proxy:
// GO111MODULE=off GOPATH=/usr/share/gocode go build -o health-server health_server.go
package main

import (
	"fmt"
	"net"
	"os"
	"sync/atomic"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"
)

// countingListener prints a line for each connection it accepts.
type countingListener struct {
	net.Listener
	accepted int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	conn, err := l.Listener.Accept()
	if err == nil {
		fmt.Printf("accepted %d\n", atomic.AddInt64(&l.accepted, 1))
	}
	return conn, err
}

func main() {
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, "listen:", err)
		os.Exit(1)
	}
	server := grpc.NewServer()
	healthpb.RegisterHealthServer(server, health.NewServer())
	reflection.Register(server)
	fmt.Printf("listening on %d\n", listener.Addr().(*net.TCPAddr).Port)
	if err := server.Serve(&countingListener{Listener: listener}); err != nil {
		fmt.Fprintln(os.Stderr, "serve:", err)
		os.Exit(1)
	}
}
