// Command decision runs the authorization decision service.
//
//	decision [serve] [flags]   serve the Authorize API
//	decision migrate [flags]   apply database migrations
//
// Flags may come before or after the command. DATABASE_URL overrides the
// config's database_url; decision -h lists the flags and variables.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/cloud-connector/cloud-connector/migrations"
	"github.com/cloud-connector/cloud-connector/services/config"
	"github.com/cloud-connector/cloud-connector/services/decision"
	"github.com/cloud-connector/cloud-connector/services/server"
	"github.com/cloud-connector/cloud-connector/services/telemetry"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "decision:", err)
		os.Exit(1)
	}
}

const usage = `Usage:
  decision [serve] [flags]   serve the Authorize API (the default command)
  decision migrate [flags]   apply the embedded database migrations, print
                             the schema version and exit

Flags may come before or after the command.

Flags:
%s
Environment:
  DATABASE_URL   PostgreSQL URL; overrides the config's database_url.
                 migrate needs only this.
  CONFIG_FILE    config file when -config is not given
  LOG_LEVEL      log level when -log-level is not given
  OTEL_*         tracing: OTEL_EXPORTER_OTLP_ENDPOINT (unset: spans are not
                 exported), OTEL_TRACES_SAMPLER[_ARG], OTEL_SERVICE_NAME,
                 OTEL_SDK_DISABLED; see deploy/README.md
`

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("decision", flag.ContinueOnError)
	// Errors are returned (main prints them once); usage is printed here.
	fs.SetOutput(io.Discard)
	configPath := fs.String("config", getenv("CONFIG_FILE"), "YAML config `file` (see deploy/config/decision.yaml)")
	logLevel := fs.String("log-level", getenv("LOG_LEVEL"), "debug, info, warn or error (default info)")
	printUsage := func(w io.Writer) {
		var flags strings.Builder
		fs.SetOutput(&flags)
		fs.PrintDefaults()
		fs.SetOutput(io.Discard)
		fmt.Fprintf(w, usage, flags.String())
	}

	// Flags, then at most one command, then flags again: flag stops at the
	// first argument that is not a flag.
	cmd := "serve"
	err := fs.Parse(args)
	if err == nil && fs.NArg() > 0 {
		cmd = fs.Arg(0)
		err = fs.Parse(fs.Args()[1:])
	}
	if errors.Is(err, flag.ErrHelp) {
		printUsage(stdout)
		return nil
	}
	if err != nil {
		return fmt.Errorf("%w (see decision -h)", err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q after command %s (see decision -h)", fs.Args(), cmd)
	}
	if cmd != "serve" && cmd != "migrate" {
		return fmt.Errorf("unknown command %q: want serve or migrate (see decision -h)", cmd)
	}

	logger, err := server.NewLogger(stderr, *logLevel)
	if err != nil {
		return err
	}
	var cfg decision.Config
	if *configPath != "" {
		if err := config.Load(*configPath, &cfg); err != nil {
			return err
		}
	}
	if v := getenv("DATABASE_URL"); v != "" {
		cfg.DatabaseURL = v
	}
	if cmd == "serve" {
		tracing, err := telemetry.New(ctx, telemetry.Config{ServiceName: "decision", Getenv: getenv})
		if err != nil {
			return err
		}
		telemetry.ReportErrors(logger)
		telemetry.LogStart(logger, tracing)
		cfg.TracerProvider = tracing.TracerProvider() // Run shuts it down
		return decision.Run(ctx, cfg, logger)
	}
	if cfg.DatabaseURL == "" {
		return errors.New("migrate: set DATABASE_URL or database_url in -config")
	}
	v, err := migrations.UpURL(ctx, cfg.DatabaseURL)
	if err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	fmt.Fprintf(stdout, "schema at version %d\n", v)
	return nil
}
