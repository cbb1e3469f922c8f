// Command decision runs the authorization decision service.
//
//	decision [serve] -config decision.yaml   serve the Authorize API
//	decision migrate                         apply database migrations
//
// DATABASE_URL overrides the config's database_url.
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
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "decision:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	cmd := "serve"
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		cmd, args = args[0], args[1:]
	}
	fs := flag.NewFlagSet("decision "+cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	configPath := fs.String("config", getenv("CONFIG_FILE"), "YAML config file")
	logLevel := fs.String("log-level", getenv("LOG_LEVEL"), "debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		return err
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
	switch cmd {
	case "serve":
		return decision.Run(ctx, cfg, logger)
	case "migrate":
		if cfg.DatabaseURL == "" {
			return errors.New("migrate: set DATABASE_URL or database_url in -config")
		}
		v, err := migrations.UpURL(ctx, cfg.DatabaseURL)
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "schema at version %d\n", v)
		return nil
	default:
		return fmt.Errorf("unknown command %q: want serve or migrate", cmd)
	}
}
