"""Placeholder pages; replaced by the governance pages."""

from django.contrib.auth.mixins import LoginRequiredMixin
from django.http import HttpResponse
from django.views import View


class OverviewView(LoginRequiredMixin, View):
    def get(self, request):
        return HttpResponse("overview")


class InvitationAcceptView(View):
    def get(self, request, token):
        return HttpResponse("invitation")
