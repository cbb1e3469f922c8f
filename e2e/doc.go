// Package e2e tests Cloud Connector end to end: the real decision service
// and gateways run in-process on loopback ports against real PostgreSQL, a
// real OIDC issuer (tokentest) and a fake backend, and the tests speak
// HTTP, Connect and gRPC to them as GitLab instances would.
package e2e
