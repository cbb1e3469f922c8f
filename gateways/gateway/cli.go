package gateway

import (
	"context"
	"flag"
	"fmt"
	"io"

	"github.com/cloud-connector/cloud-connector/gateways/routes"
	"github.com/cloud-connector/cloud-connector/services/config"
	"github.com/cloud-connector/cloud-connector/services/server"
	"github.com/cloud-connector/cloud-connector/services/telemetry"
)

// RunCommand is the whole of a gateway binary named name ("ai", "cicd"):
// flags, config file, environment overrides (DATABASE_URL, DECISION_URL),
// the built-in route table, tracing from the OTEL_* variables (see package
// telemetry), then Run.
func RunCommand(ctx context.Context, name string, args []string, getenv func(string) string, stderr io.Writer) error {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	configPath := fs.String("config", getenv("CONFIG_FILE"), "YAML config file")
	logLevel := fs.String("log-level", getenv("LOG_LEVEL"), "debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	logger, err := server.NewLogger(stderr, *logLevel)
	if err != nil {
		return err
	}
	cfg := Config{Name: name}
	if *configPath != "" {
		if err := config.Load(*configPath, &cfg); err != nil {
			return err
		}
	}
	if cfg.Name != name {
		return fmt.Errorf("config names gateway %q but this is the %s gateway (its built-in routes are %s's)", cfg.Name, name, name)
	}
	if v := getenv("DATABASE_URL"); v != "" {
		cfg.DatabaseURL = v
	}
	if v := getenv("DECISION_URL"); v != "" {
		cfg.DecisionURL = v
	}
	if cfg.Routes, err = routes.Default(name); err != nil {
		return err
	}
	tracing, err := telemetry.New(ctx, telemetry.Config{ServiceName: name, Getenv: getenv})
	if err != nil {
		return err
	}
	telemetry.ReportErrors(logger)
	telemetry.LogStart(logger, tracing)
	cfg.TracerProvider = tracing.TracerProvider() // Run shuts it down
	return Run(ctx, cfg, logger)
}
