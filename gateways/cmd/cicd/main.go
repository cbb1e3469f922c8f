// Command cicd runs the cicd gateway: see package gateway.
//
//	cicd -config cicd.yaml
//
// DATABASE_URL and DECISION_URL override the config file; the OTEL_*
// variables configure tracing (see package telemetry).
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/cloud-connector/cloud-connector/gateways/gateway"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := gateway.RunCommand(ctx, "cicd", os.Args[1:], os.Getenv, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "cicd:", err)
		os.Exit(1)
	}
}
