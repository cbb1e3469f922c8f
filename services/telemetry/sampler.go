package telemetry

import (
	"errors"
	"fmt"
	"strconv"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
)

// samplerFromEnv reads OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG.
// The default, parentbased_always_on, samples a trace when its parent was
// sampled, and every trace this process starts. Parent-based samplers
// follow the parent only where a component accepts one: the gateways start
// a new trace for every request from the internet (see package gateway),
// so the gateway's root sampler decides for the whole trace, and the
// decision service follows it.
func samplerFromEnv(env func(string) string) (sdktrace.Sampler, string, error) {
	name := env("OTEL_TRACES_SAMPLER")
	if name == "" {
		name = "parentbased_always_on"
	}
	ratio := func() (float64, error) {
		arg := env("OTEL_TRACES_SAMPLER_ARG")
		if arg == "" {
			return 1, nil
		}
		f, err := strconv.ParseFloat(arg, 64)
		if err != nil || f < 0 || f > 1 {
			return 0, fmt.Errorf("OTEL_TRACES_SAMPLER_ARG=%q: want a ratio from 0 to 1", arg)
		}
		return f, nil
	}
	var s sdktrace.Sampler
	switch name {
	case "always_on":
		s = sdktrace.AlwaysSample()
	case "always_off":
		s = sdktrace.NeverSample()
	case "traceidratio":
		r, err := ratio()
		if err != nil {
			return nil, "", err
		}
		s = sdktrace.TraceIDRatioBased(r)
	case "parentbased_always_on":
		s = sdktrace.ParentBased(sdktrace.AlwaysSample())
	case "parentbased_always_off":
		s = sdktrace.ParentBased(sdktrace.NeverSample())
	case "parentbased_traceidratio":
		r, err := ratio()
		if err != nil {
			return nil, "", err
		}
		s = sdktrace.ParentBased(sdktrace.TraceIDRatioBased(r))
	default:
		return nil, "", fmt.Errorf("OTEL_TRACES_SAMPLER=%q: %w", name, errSampler)
	}
	return s, s.Description(), nil
}

var errSampler = errors.New("want always_on, always_off, traceidratio, " +
	"parentbased_always_on, parentbased_always_off or parentbased_traceidratio")
