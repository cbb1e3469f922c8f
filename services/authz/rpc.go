package authz

import (
	"context"
	"errors"
	"log/slog"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/durationpb"

	authzv1 "github.com/cloud-connector/cloud-connector/proto/gen/cloudconnector/authz/v1"
	"github.com/cloud-connector/cloud-connector/proto/gen/cloudconnector/authz/v1/authzv1connect"
)

// Handler serves the Connect AuthorizationService over a Service. It is the
// one place domain errors become RPC codes.
type Handler struct {
	svc    *Service
	logger *slog.Logger
}

var _ authzv1connect.AuthorizationServiceHandler = (*Handler)(nil)

// NewHandler returns the RPC handler for svc.
func NewHandler(svc *Service, logger *slog.Logger) *Handler {
	return &Handler{svc: svc, logger: logger}
}

// Authorize implements authzv1connect.AuthorizationServiceHandler.
func (h *Handler) Authorize(ctx context.Context, req *connect.Request[authzv1.AuthorizeRequest]) (*connect.Response[authzv1.AuthorizeResponse], error) {
	m := req.Msg
	f := m.GetRequest()
	d, err := h.svc.Authorize(ctx, Request{
		Authorization:      m.GetAuthorization(),
		AuthenticationType: m.GetAuthenticationType(),
		Feature:            m.GetFeature(),
		Audience:           m.GetAudience(),
		Facts: Facts{
			Method:         f.GetMethod(),
			Path:           f.GetPath(),
			InstanceID:     f.GetInstanceId(),
			Realm:          f.GetRealm(),
			GlobalUserID:   f.GetGlobalUserId(),
			GitLabVersion:  f.GetGitlabVersion(),
			ClientType:     f.GetClientType(),
			DeploymentType: f.GetDeploymentType(),
			HostName:       f.GetHostName(),
			RequestID:      f.GetRequestId(),
		},
	})
	if err != nil {
		return nil, h.rpcError(ctx, err, f.GetRequestId())
	}
	return connect.NewResponse(toProto(d)), nil
}

func (h *Handler) rpcError(ctx context.Context, err error, requestID string) error {
	switch {
	case errors.Is(err, ErrInvalidRequest):
		return connect.NewError(connect.CodeInvalidArgument, err)
	case errors.Is(err, context.Canceled):
		return connect.NewError(connect.CodeCanceled, errors.New("canceled"))
	case errors.Is(err, context.DeadlineExceeded):
		return connect.NewError(connect.CodeDeadlineExceeded, errors.New("deadline exceeded"))
	case errors.Is(err, ErrUnavailable):
		h.logger.WarnContext(ctx, "authorize unavailable", "error", err, "request_id", requestID)
		return connect.NewError(connect.CodeUnavailable, errors.New("authorization temporarily unavailable"))
	default:
		h.logger.ErrorContext(ctx, "authorize failed", "error", err, "request_id", requestID)
		return connect.NewError(connect.CodeInternal, errors.New("internal error"))
	}
}

// toProto converts a Decision to its wire form.
func toProto(d Decision) *authzv1.AuthorizeResponse {
	res := &authzv1.AuthorizeResponse{
		Reason:         d.Reason,
		Message:        d.Message,
		Explanation:    d.Explanation,
		PolicyRevision: d.PolicyRevision,
		Subject: &authzv1.Subject{
			OrganizationId: d.Subject.OrganizationID,
			InstanceId:     d.Subject.InstanceID,
			Realm:          d.Subject.Realm,
			GlobalUserId:   d.Subject.GlobalUserID,
			Plan:           d.Subject.Plan,
		},
	}
	if d.CacheTTL > 0 {
		res.CacheTtl = durationpb.New(d.CacheTTL)
	}
	switch d.Outcome {
	case Allow:
		res.Outcome = authzv1.Outcome_OUTCOME_ALLOW
	case Unauthenticated:
		res.Outcome = authzv1.Outcome_OUTCOME_UNAUTHENTICATED
	case Forbidden:
		res.Outcome = authzv1.Outcome_OUTCOME_FORBIDDEN
	}
	if b := d.Budget; b != nil {
		res.Budget = &authzv1.Budget{
			Bucket: b.Bucket,
			Limit:  b.Limit,
			Window: durationpb.New(b.Window),
			Unit:   b.Unit,
			Kind:   authzv1.BudgetKind_BUDGET_KIND_RATE,
		}
		if b.Kind == Quota {
			res.Budget.Kind = authzv1.BudgetKind_BUDGET_KIND_QUOTA
		}
	}
	return res
}
